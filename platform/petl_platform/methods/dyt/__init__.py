"""DyT - Dynamic Tuning (Zhao et al., NeurIPS 2024; ``papers/dyt-dynamic-tuning.md``).

Every block gets a token dispatcher and an adapter (see ``block.py`` for the four variants).
Training (``training_step``), Sec. 3.5:
    L = CE(dynamic) + CE(complete) + KL(complete || dynamic) + alpha * (mean M - r)^2.
Choices the paper leaves open:
- ``distill=False`` drops both the complete model's CE and the KL term (Appendix A.6 ablates
  them together; dropping them saves the second, complete forward pass);
- the KL teacher (complete model) is detached: it learns from its own CE only;
- L_rate's mean runs over layers (dispatchers), patch tokens and the batch, then is squared;
  class/prefix tokens are always active and are not counted (eq. in Sec. 3.5 sums n = 1..N).

Inference (eval mode) really skips work: ``model(x)`` runs the ``sparse`` mode of ``DispatchRun``.
Serving override: ``model(x, ratio=0.3)`` keeps each image's top 30 % patch tokens by dispatcher
score instead of the 0.5 threshold (eval only). ``model(x, mode=...)`` picks ``sparse`` /
``masked`` (dense compute times the mask, a reference) / ``complete`` (no dispatcher) / ``train``.
After every non-training forward, ``model.last_stats()`` returns the measured activation rate per
layer and the FLOPs (multiply-accumulates) that actually ran next to the dense adapter model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ...errors import PetlError
from ..base import PetlModel, StepOutput, find_modules, replace_module
from ..config import MethodConfig, check
from ..registry import MethodSpec, register_method
from .block import VARIANTS, DyTBlock
from .modules import MODES, DispatchRun, DyTAdapter, TokenDispatcher

__all__ = ["DyTConfig", "DyTModel", "DyTBlock", "DyTAdapter", "TokenDispatcher", "DispatchRun"]


@dataclass(frozen=True)
class DyTConfig(MethodConfig):
    bottleneck: int = 8  # adapter width d (paper: 8 on VTAB-1k, 64 elsewhere)
    target_rate: float = 0.5  # r, the target token activation rate (paper: 0.5 / 0.7 / 0.9)
    dispatch: str = "mlp"  # mlp | attn | attn_mlp | layer (Sec. 3.3)
    experts: int = 1  # MoE-adapter experts N (1 = plain adapter, Sec. 3.4)
    tau: float = 5.0  # Gumbel-sigmoid temperature (eq. 4)
    rate_weight: float = 2.0  # alpha, weight of L_rate
    distill: bool = True  # complete-model CE + KL(complete || dynamic)

    def __post_init__(self):
        check(self.bottleneck >= 1, "bottleneck must be >= 1")
        check(0.0 <= self.target_rate <= 1.0, "target_rate must be in [0, 1]")
        check(self.dispatch in VARIANTS, f"dispatch must be one of {', '.join(VARIANTS)}, got {self.dispatch!r}")
        check(self.experts >= 1, "experts must be >= 1")
        check(self.tau > 0, "tau must be > 0")
        check(self.rate_weight >= 0, "rate_weight must be >= 0")


class DyTModel(PetlModel):
    config: DyTConfig

    def inject(self) -> None:
        c = self.config
        hits = find_modules(self.vit, r"blocks\.\d+", Block)  # check all first, then replace
        for name, blk in hits:
            replace_module(self.vit, name, DyTBlock(blk, self.vit.embed_dim, c.bottleneck, c.experts, c.dispatch))
        self._last_stats: dict | None = None

    # ----------------------------------------------------------------- forward
    def new_run(self, mode: str | None = None, ratio: float | None = None) -> DispatchRun:
        mode = mode or ("train" if self.training else "sparse")
        if mode not in MODES:
            raise PetlError(f"unknown DyT mode {mode!r}; valid modes: {', '.join(MODES)}")
        if ratio is not None:
            if mode not in ("sparse", "masked"):
                raise PetlError(f"ratio is an inference override (eval mode, sparse or masked); got mode {mode!r}")
            if not 0.0 <= float(ratio) <= 1.0:
                raise PetlError(f"ratio must be in [0, 1], got {ratio}")
        return DispatchRun(mode, self.vit.num_prefix_tokens, self.config.tau, ratio)

    def forward_blocks(self, x: torch.Tensor, run: DispatchRun | None = None) -> torch.Tensor:
        run = run or self.new_run()
        for i, blk in enumerate(self.vit.blocks):
            run.layer = i
            x = blk(x, run)
        return x

    def forward_tail(self, states: list[torch.Tensor]) -> torch.Tensor:
        return self._logits(states[0], self.new_run())

    def forward(self, x: torch.Tensor, ratio: float | None = None, mode: str | None = None) -> torch.Tensor:
        return self._logits(self.embed(x), self.new_run(mode, ratio))

    def _logits(self, z: torch.Tensor, run: DispatchRun) -> torch.Tensor:
        logits = self.forward_head(self.vit.norm(self.forward_blocks(z, run)))
        if run.counting:
            self.record_stats(run, z.shape[0], z.shape[1] - self.vit.num_prefix_tokens)
        return logits

    def record_stats(self, run: DispatchRun, batch: int, patches: int) -> None:
        """Keep ``run``'s measured stats as ``last_stats()`` (also after a cross-task pass)."""
        self._last_stats = self.run_stats(run, batch, patches)

    def run_stats(self, run: DispatchRun, batch: int, patches: int) -> dict:
        embed = batch * patches * self.vit.patch_embed.proj.weight.numel()
        head = batch * self.head.in_features * self.head.out_features
        flops, dense = run.macs + embed + head, run.dense_macs + embed + head
        return {"mode": run.mode, "ratio": run.ratio, "batch": batch,
                "activation_rate_per_layer": run.per_layer(self.depth),
                "activation_rate": sum(run.rates) / len(run.rates) if run.rates else 1.0,
                "flops": flops, "dense_flops": dense, "flops_ratio": flops / dense}

    def infer(self, x: torch.Tensor, ratio: float | None = None) -> tuple[torch.Tensor, dict]:
        return self(x, ratio=ratio), self.last_stats()

    @staticmethod
    def infer_many(models: list, xs: list[torch.Tensor], ratios: list[float | None]) -> list[tuple[torch.Tensor, dict]]:
        """Several DyT tasks at once (the engine's token-dispatch runtime): ``[(logits, stats)]``."""
        from .mixed import infer_many

        return infer_many(models, xs, ratios)

    def last_stats(self) -> dict:
        """Stats of the last non-training forward: measured activation rate per layer (patch
        tokens; mean of the layer's dispatchers), ``flops`` that ran and ``dense_flops`` of the
        dense adapter model (no dispatch), both in multiply-accumulates, for the whole batch."""
        if self._last_stats is None:
            raise PetlError("no DyT inference has run yet: call the model in eval mode first")
        return dict(self._last_stats)

    # ----------------------------------------------------------------- training
    def training_step(self, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        c = self.config
        z = self.embed(x)
        run = self.new_run("train")
        logits = self.forward_head(self.vit.norm(self.forward_blocks(z, run)))
        rate = run.rate_tensor()
        loss_cls = F.cross_entropy(logits, y)
        loss_rate = (rate - c.target_rate) ** 2  # L_rate, Sec. 3.5
        loss = loss_cls + c.rate_weight * loss_rate
        metrics = {"loss_cls": loss_cls.item(), "loss_rate": loss_rate.item(), "activation_rate": rate.item()}
        if c.distill:
            full = self.forward_head(self.vit.norm(self.forward_blocks(z, self.new_run("complete"))))
            loss_full = F.cross_entropy(full, y)
            loss_kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(full.detach(), -1),
                               log_target=True, reduction="batchmean")  # KL(complete || dynamic)
            loss = loss + loss_full + loss_kl
            metrics.update(loss_complete=loss_full.item(), loss_distill=loss_kl.item())
        return StepOutput(loss, logits, metrics)


register_method(MethodSpec("dyt", DyTModel, DyTConfig, runtime="token_dispatch", mergeable=False,
                           recipe={"lr": 1.5e-2},  # won on val across the fair basis (bench/recipe_lr.py)
                           # + the lr around the recipe's (registry.LR_MULTIPLES). DyT has no dropout: the
                           # dispatcher's token skipping is its dropout-like disturbance (paper, A.1), and
                           # target_rate sets how much of it
                           search_space={"target_rate": "uniform(0.3,0.9)"},
                           description="DyT: token dispatcher skips the frozen MLP for inactive tokens + adapter"))

"""Dyn-Adapter (``papers/dyn-adapter.md``) as a mixin over any token-sequential base method.

``DynExitMixin`` sits before the base method's ``PetlModel`` subclass in the MRO, so the base's
``inject()`` adds its modules and the mixin then adds S - 1 early exit heads (the S-th exit is the
base's own ``head``). Choices the paper leaves open, fixed here:

- Stages (Sec. 3.2): exit ``i`` (1-based) reads the output of block ``l = iT``, ``T = depth / S``.
  Stages ``1 .. floor(S/2)`` are *shallow*, the rest *deep* (S = 4: exits 1, 2 shallow; 3, 4 deep).
- Pooling: every exit applies the backbone's frozen final ``norm`` and its pooling
  (``vit.forward_head(pre_logits=True)``: cls token or average, per ``vit.global_pool``).
- Head balance (Eq. 5): ``head_policy="balanced"`` gives shallow exits an MLP head
  ``Linear(D, head_hidden) -> GELU -> Linear(head_hidden, C)`` and deep exits a linear head;
  ``"linear"`` / ``"mlp"`` use one kind for every early exit. The last exit is always ``self.head``
  (linear), so the full-depth model is exactly the base method.
- Adaptive prioritisation (Eq. 4 weights): with training progress ``t`` in [0, 1] and a curve
  ``c(t)`` (``cosine``: ``(1 - cos(pi t)) / 2``; ``linear``: ``t``), both rising from 0 to 1,
  ``lambda_shallow(t) = ls0 + (b - ls0) c(t)`` and ``lambda_deep(t) = ld0 - (ld0 - b) c(t)``
  with ``b = lambda_bound = 0.5``, so ``sup lambda_shallow = inf lambda_deep = b``.
- Bidirectional sparsification (Sec. 3.3): forward, ``branch_dropout.p`` of every
  ``AdapterModule`` of a shallow-stage block is ``p_shallow``, of a deep-stage block ``p_deep``
  (this supersedes the base method's own ``dropout`` hyperparameter in ``dyn_<base>``);
  backward, ``after_backward`` zeroes each trainable gradient entry with probability ``p_m``
  (Eq. 6, a fresh mask every step). Heads are masked too when ``mask_heads`` (default): Eq. 6 is
  stated for every updated weight. With AdamW a zeroed gradient still lets the moment estimates
  move the weight; we implement Eq. 6 on the gradient as written.
- Inference (Sec. 3.4): ``model(x)`` is always the full-depth final exit (so merging, the loop's
  evaluation and cross-method tests hold). ``predict_dynamic`` runs stage by stage and removes
  samples whose max softmax reaches their stage's threshold from the batch.
- ``shared_prefix_blocks`` is 0: the loop's cached-trunk path trains with a plain CE on the final
  logits and would bypass the multi-exit loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from ...errors import PetlError
from ..base import PetlModel, StepOutput, adapter_modules
from .calibrate import NEVER, exit_costs

HEAD_PREFIXES = ("head.", "exits.")


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


# The CPU fused attention kernel has no formula in torch's FlopCounterMode; the CUDA ones do.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(fn, *args) -> int:
    """FLOPs (2 x multiply-adds of matmuls and attention) of ``fn(*args)``, as executed."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        fn(*args)
    return counter.get_total_flops()


def make_exit_head(kind: str, dim: int, num_classes: int, hidden: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
    return nn.Linear(dim, num_classes)


def lambda_curve(name: str, t: float) -> float:
    t = min(1.0, max(0.0, float(t)))
    return (1.0 - math.cos(math.pi * t)) / 2.0 if name == "cosine" else t


def stage_weights(cfg, progress: float) -> list[float]:
    """lambda_i of Eq. 4 at training ``progress`` (formula in the module docstring)."""
    c = lambda_curve(cfg.lambda_curve, progress)
    shallow = cfg.lambda_shallow_start + (cfg.lambda_bound - cfg.lambda_shallow_start) * c
    deep = cfg.lambda_deep_start - (cfg.lambda_deep_start - cfg.lambda_bound) * c
    return [shallow if i < cfg.stages // 2 else deep for i in range(cfg.stages)]


class DynExitMixin:
    """Early exits over a base ``PetlModel`` subclass; see the module docstring."""

    dyn_base: str = ""  # the base method's registry name, set on each generated class

    # ----------------------------------------------------------------- construction
    def inject(self) -> None:
        super().inject()
        cfg, depth = self.config, len(self.vit.blocks)
        if depth % cfg.stages:
            raise PetlError(f"{self.method}: stages={cfg.stages} does not divide the backbone depth {depth}; "
                            f"choose stages among {[s for s in range(2, depth + 1) if depth % s == 0]}")
        self.interval = depth // cfg.stages
        dim = self.vit.num_features
        self.exits = nn.ModuleList(make_exit_head(self.exit_head_kind(i), dim, self.num_classes, cfg.head_hidden)
                                   for i in range(cfg.stages - 1))
        # Calibrated per-exit confidence thresholds (exits 1 .. S-1); a buffer, so artifacts keep it.
        self.register_buffer("exit_thresholds", torch.full((cfg.stages - 1,), NEVER))
        for b in range(depth):  # forward sparsification (Sec. 3.3)
            p = cfg.p_shallow if self.is_shallow_block(b) else cfg.p_deep
            for m in adapter_modules(self.vit, b):
                m.branch_dropout.p = p

    def is_shallow_stage(self, stage: int) -> bool:
        return stage < self.config.stages // 2

    def is_shallow_block(self, block: int) -> bool:
        return self.is_shallow_stage(block // self.interval)

    def exit_head_kind(self, stage: int) -> str:
        policy = self.config.head_policy
        if policy == "balanced":
            return "mlp" if self.is_shallow_stage(stage) else "linear"
        return policy

    @property
    def stages(self) -> int:
        return self.config.stages

    @property
    def shared_prefix_blocks(self) -> int:
        return 0

    # ----------------------------------------------------------------- stage-wise forward
    def run_stage(self, h: torch.Tensor, stage: int) -> torch.Tensor:
        for blk in self.vit.blocks[stage * self.interval:(stage + 1) * self.interval]:
            h = blk(h)
        return h

    def exit_logits(self, h: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits of exit ``stage`` (0-based) from the tokens after its last block."""
        feats = self.vit.norm(h)
        if stage == self.stages - 1:
            return self.forward_head(feats)
        return self.exits[stage](self.vit.forward_head(feats, pre_logits=True))

    def exit_head(self, stage: int) -> nn.Module:
        return self.head if stage == self.stages - 1 else self.exits[stage]

    def all_exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = self.embed(x), []
        for s in range(self.stages):
            h = self.run_stage(h, s)
            out.append(self.exit_logits(h, s))
        return out

    # ----------------------------------------------------------------- training
    def stage_weights(self, progress: float) -> list[float]:
        return stage_weights(self.config, progress)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        logits = self.all_exit_logits(x)
        lam = self.stage_weights(progress)
        losses = [F.cross_entropy(z, y) for z in logits]
        loss = sum(w * l for w, l in zip(lam, losses))  # Eq. 4
        metrics = {}
        for i, (w, l, z) in enumerate(zip(lam, losses, logits), 1):
            metrics.update({f"exit{i}_loss": l.item(), f"exit{i}_acc": (z.argmax(-1) == y).float().mean().item(),
                            f"lambda{i}": w})
        return StepOutput(loss, logits[-1], metrics)

    def after_backward(self) -> None:
        """Eq. 6: ``grad <- grad (*) M``, ``M_j ~ Bernoulli(1 - p_m)``, fresh each step."""
        super().after_backward()
        p_m = self.config.p_m
        if p_m <= 0:
            return
        for name, p in self.named_parameters():
            if not p.requires_grad or p.grad is None:
                continue  # frozen backbone tensors are never touched
            if not self.config.mask_heads and name.startswith(HEAD_PREFIXES):
                continue
            p.grad.mul_(torch.rand_like(p.grad, dtype=torch.float32).ge(p_m).to(p.grad.dtype))

    # ----------------------------------------------------------------- dynamic inference
    def flop_profile(self) -> dict:
        """Per-sample FLOPs of the embedding, each stage's blocks and each exit head, measured once
        by running them on one sample under ``FlopCounterMode`` (adapter overhead included)."""
        cached = self.__dict__.get("_flop_profile")
        if cached is not None:
            return cached
        p = next(self.vit.parameters())
        size = self.vit.patch_embed.img_size
        x = torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            embed = count_flops(self.embed, x)
            h, stage, head = self.embed(x), [], []
            for s in range(self.stages):
                stage.append(count_flops(self.run_stage, h, s))
                h = self.run_stage(h, s)
                head.append(count_flops(self.exit_logits, h, s))
        self.train(was_training)
        full = embed + sum(stage) + head[-1]  # what ``model(x)`` runs
        prof = {"embed": embed, "stage": stage, "head": head, "full": full}
        self.__dict__["_flop_profile"] = prof
        return prof

    def exit_blocks(self) -> list[int]:
        return [(s + 1) * self.interval for s in range(self.stages)]

    def exit_costs(self) -> list[float]:

        return [float(c) for c in exit_costs(self)]

    def exit_thresholds_for(self, thresholds=None) -> torch.Tensor:
        """The S - 1 early-exit thresholds: ``thresholds`` when given (checked), else the calibrated ones."""
        if thresholds is None:
            return self.exit_thresholds.detach().float().cpu()
        t = torch.as_tensor(thresholds, dtype=torch.float32).flatten().cpu()
        if len(t) != self.stages - 1:
            raise PetlError(f"{self.method}: expected {self.stages - 1} thresholds (one per early exit), got {len(t)}")
        return t

    @torch.no_grad()
    def predict_dynamic(self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor | None = None) -> dict:
        """Early-exit inference (Sec. 3.4) with batch shrinking.

        After exit ``i`` the samples whose max softmax probability is ``>= thresholds[i]`` leave the
        batch; only the rest run the next stage. ``thresholds`` overrides the stored (calibrated)
        ones for this call. Returns ``logits`` (input order), ``exit_stage`` (1-based), ``flops``
        (measured: each stage's per-sample FLOPs x the samples that ran it, heads included) and
        ``full_flops`` (the same batch through ``model(x)``).
        """
        thr = self.exit_thresholds_for(thresholds)
        prof = self.flop_profile()
        n = len(x)
        out = torch.empty(n, self.num_classes, device=x.device)
        exit_stage = torch.full((n,), self.stages, dtype=torch.long)
        idx = torch.arange(n, device=x.device)
        h, flops = self.embed(x), prof["embed"] * n
        for s in range(self.stages):
            h = self.run_stage(h, s)
            logits = self.exit_logits(h, s)
            flops += (prof["stage"][s] + prof["head"][s]) * len(idx)
            if s == self.stages - 1:
                out[idx] = logits.float()
                break
            leave = logits.softmax(-1).amax(-1) >= thr[s].item()
            if leave.any():
                out[idx[leave]] = logits[leave].float()
                exit_stage[idx[leave].cpu()] = s + 1
                keep = ~leave
                idx, h = idx[keep], h[keep]
            if len(idx) == 0:
                break
        return {"logits": out, "exit_stage": exit_stage, "flops": int(flops), "full_flops": int(prof["full"] * n)}

    def infer(self, x: torch.Tensor, thresholds=None) -> tuple[torch.Tensor, dict]:
        r = self.predict_dynamic(x, thresholds)
        return r["logits"], {"exit_stage": r["exit_stage"].tolist(), "flops": r["flops"], "full_flops": r["full_flops"]}

    # ----------------------------------------------------------------- merging
    def merged(self) -> nn.Module:
        """Fold the base method's modules into the trunk (base ``merged()``), keep the exits:
        returns a ``dyn_linear`` model over the merged trunk with copies of heads and thresholds."""
        from ..registry import get_method

        if not get_method(self.dyn_base).mergeable:
            raise PetlError(f"method {self.method!r} is not mergeable: its base {self.dyn_base!r} cannot be folded")
        trunk = super().merged()
        spec = get_method("dyn_linear")
        dyn_keys = set(spec.config_cls.field_names())
        cfg = spec.config_cls.from_dict({k: v for k, v in self.config.to_dict().items() if k in dyn_keys}, "dyn_linear")
        out = spec.model_cls(trunk.vit, self.num_classes, cfg, f"{self.method}:merged")
        out.head.load_state_dict(self.head.state_dict())
        out.exits.load_state_dict(self.exits.state_dict())
        out.exit_thresholds.copy_(self.exit_thresholds)
        out.backbone_name, out.backbone_fingerprint = self.backbone_name, self.backbone_fingerprint
        return out.to(self.exit_thresholds.device).train(self.training)


def make_dyn_model_class(base_name: str, base_cls: type) -> type:
    """``Dyn<Base>``: the mixin stacked on the base method's model class."""
    if not issubclass(base_cls, PetlModel):
        raise TypeError(f"{base_cls} is not a PetlModel")
    name = f"Dyn{base_cls.__name__}"
    cls = type(name, (DynExitMixin, base_cls), {"dyn_base": base_name, "__module__": __name__, "__qualname__": name})
    globals()[name] = cls  # importable by qualified name (pickling)
    return cls

"""Adapter, AdaptFormer style (Chen et al., 2022): a parallel bottleneck beside every block's MLP.

    X_out = X' + MLP(LN(X')) + s * (ReLU(X_in W_down + b_down) W_up + b_up)

Choices the paper leaves open or states two ways, written down here:

- ``adapter_input``: the AdaptFormer paper's equation feeds LN(X') (the MLP's own input), while
  its released code (``ffn_adapter_layernorm_option="none"``) and our spec (METHODS.md:
  ``s * ReLU(X W_down) W_up``) feed the un-normalised residual stream X'. Default ``"x"`` (the
  spec and the official code); ``"ln"`` gives the paper's equation. Either way the frozen LN is
  reused, no new LayerNorm is trained.
- Init as AdaptFormer's ``init_option="lora"``: W_down kaiming-uniform(a=sqrt(5)), W_up and both
  biases zero, so the model equals the frozen backbone at init. ``s`` is a fixed scalar (0.1).
- ``branch_dropout`` acts on the adapter's output (the added branch), the frozen MLP never drops.
- Mechanics: the block's ``norm2`` becomes ``Identity`` and ``mlp`` becomes ``ParallelAdapterMlp``
  holding the frozen LN and MLP, so the adapter can see X'. With a layer-scale backbone (``ls2``)
  the adapter's output is scaled by it too; timm ViT-B has none.

Not mergeable: the ReLU makes the branch non-linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import PetlError
from ..base import AdapterModule, PetlModel, find_modules, replace_module, row_index
from ..config import MethodConfig, check
from ..registry import BankLayout, MethodSpec, register_method

MLP = r"blocks\.\d+\.mlp"


@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    bottleneck: int = 8  # d: hidden width of the adapter (8 on VTAB-1k)
    scale: float = 0.1  # s: fixed multiplier of the adapter's output
    adapter_input: str = "x"  # "x": the residual stream X' (spec, official code); "ln": LN(X') (paper Eq.)
    dropout: float = 0.0  # rate of branch_dropout on the adapter's output

    def __post_init__(self):
        check(self.bottleneck >= 1, "bottleneck must be >= 1")
        check(self.adapter_input in ("x", "ln"), f"adapter_input must be 'x' or 'ln', got {self.adapter_input!r}")
        check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")


class ParallelAdapterMlp(AdapterModule):
    """``MLP(LN(x)) + s * up(ReLU(down(x or LN(x))))`` with the LN and MLP frozen."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, dim: int, bottleneck: int, scale: float, on_norm: bool):
        super().__init__()
        self.norm, self.mlp = norm, mlp
        self.scale, self.on_norm = scale, on_norm
        kw = dict(device=norm.weight.device, dtype=norm.weight.dtype) if getattr(norm, "weight", None) is not None else {}
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, dim, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    absorbs = ("norm2",)  # the block's norm2 runs inside: the branch may read X' itself

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.up(torch.relu(self.down(self.norm(x) if self.on_norm else x)))
        return self.branch_dropout(self.scale * branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        branch = self.up(torch.relu(self.down(h if self.on_norm else x)))
        return self.mlp(h) + self.branch_dropout(self.scale * branch)

    @classmethod
    def add_batched_output_delta(cls, out, mods, x, lengths) -> None:
        """Every row's own bottleneck with two gathered ``baddbmm``s (one width and input choice)."""
        first = mods[0]
        if len(mods) == 1 or any(m.on_norm != first.on_norm or m.down.weight.shape != first.down.weight.shape
                                 for m in mods):
            return super().add_batched_output_delta(out, mods, x, lengths)
        idx = row_index(lengths, x.device)
        h = x.reshape(len(x), -1, x.shape[-1])
        if first.on_norm:
            h = first.norm(h)  # the frozen LayerNorm: the same for every task
        wd, bd = (torch.stack([getattr(m.down, k) for m in mods])[idx] for k in ("weight", "bias"))
        wu, bu = (torch.stack([getattr(m.up, k) for m in mods])[idx] for k in ("weight", "bias"))
        scale = torch.tensor([m.scale for m in mods], device=x.device, dtype=x.dtype)[idx].view(-1, 1, 1)
        z = torch.relu(torch.baddbmm(bd.unsqueeze(1), h, wd.transpose(1, 2)))
        out.view(len(out), -1, out.shape[-1]).add_(scale * torch.baddbmm(bu.unsqueeze(1), z, wu.transpose(1, 2)))

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        return {"wd": self.down.weight, "bd": self.down.bias, "wu": self.up.weight, "bu": self.up.bias}

    def bank_static(self) -> tuple:
        return (self.on_norm, self.scale)

    @classmethod
    def bank_output_delta(cls, mod, out, x, w) -> None:
        """Every row's own bottleneck ``s up(ReLU(down(x)))``, weights gathered per row."""
        h = x.reshape(len(x), -1, x.shape[-1])
        if mod.on_norm:
            h = mod.norm(h)  # the frozen LayerNorm: the same for every task
        z = torch.relu(torch.matmul(h, w["wd"].transpose(1, 2)) + w["bd"].unsqueeze(1))
        branch = torch.matmul(z, w["wu"].transpose(1, 2)) + w["bu"].unsqueeze(1)
        out.view(len(out), -1, out.shape[-1]).add_(mod.scale * branch)


class AdapterModel(PetlModel):
    def inject(self) -> None:
        cfg = self.config
        hits = find_modules(self.vit, MLP)
        dim = self.vit.embed_dim
        for name, _ in hits:
            blk = self.vit.get_submodule(name.rpartition(".")[0])
            if not isinstance(getattr(blk, "norm2", None), nn.LayerNorm):
                raise PetlError(f"adapter needs pre-norm timm Blocks: {name} has no LayerNorm norm2 beside it")
        for name, mlp in hits:
            block = name.rpartition(".")[0]
            norm = self.vit.get_submodule(f"{block}.norm2")
            module = ParallelAdapterMlp(norm, mlp, dim, cfg.bottleneck, cfg.scale, cfg.adapter_input == "ln")
            module.branch_dropout.p = cfg.dropout
            replace_module(self.vit, f"{block}.norm2", nn.Identity())
            replace_module(self.vit, name, module)


register_method(MethodSpec("adapter", AdapterModel, AdapterConfig, runtime="per_row_adapter", mergeable=False,
                           recipe={"lr": 4.5e-2},  # won on val across the fair basis (bench/recipe_lr.py)
                           bank=BankLayout((ParallelAdapterMlp,)),
                           # + the lr around the recipe's (registry.LR_MULTIPLES)
                           search_space={"bottleneck": "choice(4,8,16)", "dropout": "uniform(0.0,0.3)"},
                           description="AdaptFormer parallel bottleneck (d=8, s=0.1) beside every MLP"))

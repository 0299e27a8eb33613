"""ARC, Adapter Re-Composing (Dong et al., NeurIPS 2023; ../shared/papers/arc-adapter-recomposing.md).

One down-projection per path shared by all layers, the up-projection its transpose, and per
layer only a coefficient vector c^(l) and a bias:

    ARC(x_in) = x_in W_down C^(l) W_up + x_in (+ bias),   W_up = W_down^T,  C^(l) = diag(c^(l))
    x' = MHA(ARC_MHA(LN(x))) + x,   x = FFN(ARC_FFN(LN(x'))) + x'

ARC sits on the LayerNorm output before ``attn.qkv`` (attention path) and ``mlp.fc1`` (MLP path),
the only layers that read it, so at inference it folds into them exactly (paper):
``W1' = (W_down C W_up + I) W1``; in torch's ``y = x W^T + b`` that is ``W' = W (I + M)``,
``b' = W bias + b`` with ``M = W_down C W_up`` (symmetric).

``arc`` adapts both paths (two shared matrices); ``arc_att`` the attention path only (one).
Choices, as the official code (DavidYanAnDe/ARC): W_down xavier-uniform, c^(l) and the bias
zero-initialised, so the model equals the frozen backbone at init; ``branch_dropout`` acts on the
added branch. The shared matrices live in ``model.arc`` (an ``AdapterModule`` outside the ViT)
and each layer module holds an *unregistered* reference to it, so the checkpoint stores each
shared matrix once. ``rank`` must not exceed the backbone width (default 50, ViT-B's setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import PetlError
from ..base import AdapterModule, PetlModel, find_modules, replace_module, row_index
from ..config import MethodConfig, check
from ..lora.merge import fold_affine, plain_merged
from ..registry import BankLayout, MethodSpec, register_method

TARGETS = {"attn": r"blocks\.\d+\.attn\.qkv", "mlp": r"blocks\.\d+\.mlp\.fc1"}


@dataclass(frozen=True)
class ArcConfig(MethodConfig):
    rank: int = 50  # r: width of the shared W_down (<= backbone width)
    dropout: float = 0.0  # rate of branch_dropout on the added branch (official default 0)

    def __post_init__(self):
        check(self.rank >= 1, "rank must be >= 1")
        check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")


class ArcShared(AdapterModule):
    """The shared down-projections, one ``C x r`` matrix per adapted path."""

    def __init__(self, paths: tuple[str, ...], dim: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.ParameterDict({p: nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype)) for p in paths})
        for w in self.down.values():
            nn.init.xavier_uniform_(w)


class ArcLinear(AdapterModule):
    """``base(ARC(x))`` for one layer and path: coefficients c^(l) and bias are this layer's own."""

    def __init__(self, base: nn.Linear, shared: ArcShared, path: str, rank: int):
        super().__init__()
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.base, self.path = base, path
        self._shared = (shared,)  # a tuple: not registered, so not saved once per layer
        self.coef = nn.Parameter(torch.zeros(rank, **kw))  # c^(l)
        self.bias = nn.Parameter(torch.zeros(base.in_features, **kw))

    @property
    def down(self) -> torch.Tensor:
        return self._shared[0].down[self.path]

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def input_delta(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down
        return self.branch_dropout(((x @ d) * self.coef) @ d.T + self.bias)  # x W_down C W_up (+ bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.input_delta(x))

    @classmethod
    def batched_input_delta(cls, mods, x, lengths):
        """Every row's own ``x W_down C W_up + bias`` with two gathered ``bmm``s (one rank)."""
        if len(mods) == 1 or len({m.coef.shape for m in mods}) > 1:
            return super().batched_input_delta(mods, x, lengths)
        idx = row_index(lengths, x.device)
        d = torch.stack([m.down for m in mods])[idx]  # [rows, C, r]
        coef = torch.stack([m.coef for m in mods])[idx].unsqueeze(1)
        bias = torch.stack([m.bias for m in mods])[idx].unsqueeze(1)
        h = x.reshape(len(x), -1, x.shape[-1])
        return torch.baddbmm(bias, torch.bmm(h, d) * coef, d.transpose(1, 2)).reshape(x.shape)

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        return {"down": self.down, "coef": self.coef, "bias": self.bias}  # down: the model's shared matrix

    def bank_static(self) -> tuple:
        return (self.path,)

    @classmethod
    def bank_input_delta(cls, mod, x, w) -> torch.Tensor:
        """Every row's own ``x W_down C W_up + bias``, gathered per row."""
        d = w["down"]  # [rows, C, r]
        h = x.reshape(len(x), -1, x.shape[-1])
        z = torch.matmul(torch.matmul(h, d) * w["coef"].unsqueeze(1), d.transpose(1, 2)) + w["bias"].unsqueeze(1)
        return z.reshape(x.shape)

    def folded(self) -> nn.Linear:
        d = self.down.detach().double()
        m = (d * self.coef.detach().double()) @ d.T  # W_down C W_up
        a = m + torch.eye(d.shape[0], dtype=torch.float64, device=d.device)
        return fold_affine(self.base, a, self.bias)  # W (M + I), W bias + b


class ArcModel(PetlModel):
    PATHS: tuple[str, ...] = ("attn", "mlp")

    def inject(self) -> None:
        rank, dim = self.config.rank, self.vit.embed_dim
        if rank > dim:
            raise PetlError(f"{self.method} rank {rank} exceeds the backbone width {dim}: the shared "
                            f"down-projection is {dim} x rank; pass rank <= {dim}")
        hits = {p: find_modules(self.vit, TARGETS[p], nn.Linear) for p in self.PATHS}
        ref = hits[self.PATHS[0]][0][1].weight
        self.arc = ArcShared(self.PATHS, dim, rank, device=ref.device, dtype=ref.dtype)
        for path, found in hits.items():
            for name, base in found:
                module = ArcLinear(base, self.arc, path, rank)
                module.branch_dropout.p = self.config.dropout
                replace_module(self.vit, name, module)

    def merged(self) -> nn.Module:
        return plain_merged(self, {n: m.folded() for n, m in self.vit.named_modules() if isinstance(m, ArcLinear)})


class ArcAttModel(ArcModel):
    PATHS = ("attn",)


# + the lr around the recipe's (registry.LR_MULTIPLES); the rate is the branch dropout (official default 0)
_SPACE = {"rank": "choice(4,8,16)", "dropout": "uniform(0.0,0.3)"}
register_method(MethodSpec("arc", ArcModel, ArcConfig, runtime="per_row_adapter", mergeable=True, search_space=_SPACE,
                           recipe={"lr": 1.5e-2},  # won on val across the fair basis (bench/recipe_lr.py)
                           bank=BankLayout((ArcLinear,)),
                           description="ARC (r=50): shared W_down / W_down^T + per-layer coefficients before qkv and fc1"))
register_method(MethodSpec("arc_att", ArcAttModel, ArcConfig, runtime="per_row_adapter", mergeable=True, search_space=_SPACE,
                           bank=BankLayout((ArcLinear,)),
                           description="ARC on the attention path only (before qkv)"))

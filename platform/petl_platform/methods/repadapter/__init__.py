"""RepAdapter (Luo et al., 2023, "Towards Efficient Visual Adaption via Structural
Re-parameterization"): a *linear* sequential adapter before attention and before the MLP,

    f(X) = X + s * ((X W_d + b_d) W_u + b_u),   W_u group-wise (groups g)

placed, as in the paper's code, on the LayerNorm output just before the first linear layer of
each path (``attn.qkv`` and ``mlp.fc1``), so it re-parameterises *exactly* into that layer: ``W' = W (I + s W_u W_d)``, ``b' = W s (W_u b_d + b_u) + b``.

Choices written down here: init as the official code (W_d xavier-uniform, W_u and both biases
zero, so the model equals the frozen backbone at init); ``scale`` s defaults to 1 (the paper
searches it per task); the group-wise W_u is stored as ``[g, C/g, r/g]`` (a block-diagonal
``C x r`` matrix, the paper's grouped 1x1 conv); ``branch_dropout`` acts on the adapter's added
branch (the paper's dropout sits inside the same branch, between W_d and W_u).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import PetlError
from ..base import AdapterModule, PetlModel, find_modules, replace_module
from ..config import MethodConfig, check
from ..lora.merge import fold_affine, plain_merged
from ..registry import BankLayout, MethodSpec, register_method

TARGETS = {"attn": r"blocks\.\d+\.attn\.qkv", "mlp": r"blocks\.\d+\.mlp\.fc1"}


@dataclass(frozen=True)
class RepAdapterConfig(MethodConfig):
    bottleneck: int = 8  # r: hidden width
    groups: int = 2  # g: groups of the up-projection W_u
    scale: float = 1.0  # s
    dropout: float = 0.0  # rate of branch_dropout on the added branch

    def __post_init__(self):
        check(self.bottleneck >= 1, "bottleneck must be >= 1")
        check(self.groups >= 1 and self.bottleneck % self.groups == 0,
              f"groups ({self.groups}) must divide bottleneck ({self.bottleneck})")
        check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")


class RepAdapterLinear(AdapterModule):
    """``base(f(x))``: the RepAdapter ``f`` followed by the frozen linear layer it folds into."""

    def __init__(self, base: nn.Linear, bottleneck: int, groups: int, scale: float):
        super().__init__()
        dim = base.in_features
        if dim % groups:
            raise PetlError(f"RepAdapter groups ({groups}) must divide the backbone width ({dim})")
        self.base, self.groups, self.scale = base, groups, scale
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.down = nn.Linear(dim, bottleneck, **kw)  # W_d, b_d
        self.up_weight = nn.Parameter(torch.zeros(groups, dim // groups, bottleneck // groups, **kw))  # W_u
        self.up_bias = nn.Parameter(torch.zeros(dim, **kw))  # b_u
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x).unflatten(-1, (self.groups, -1))  # [..., g, r/g]
        up = torch.einsum("...gi,goi->...go", h, self.up_weight).flatten(-2)
        return self.scale * (up + self.up_bias)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def input_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_dropout(self.branch(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.input_delta(x))

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        return {"wd": self.down.weight, "bd": self.down.bias, "wu": self.up_weight, "bu": self.up_bias}

    def bank_static(self) -> tuple:
        return (self.groups, self.scale)

    @classmethod
    def bank_input_delta(cls, mod, x, w) -> torch.Tensor:
        """Every row's own ``s ((x W_d + b_d) W_u + b_u)``, the group-wise W_u gathered per row."""
        h = x.reshape(len(x), -1, x.shape[-1])
        z = (torch.matmul(h, w["wd"].transpose(1, 2)) + w["bd"].unsqueeze(1)).unflatten(-1, (mod.groups, -1))
        up = torch.einsum("ntgi,ngoi->ntgo", z, w["wu"].expand(len(x), *w["wu"].shape[1:])).flatten(-2)
        return (mod.scale * (up + w["bu"].unsqueeze(1))).reshape(x.shape)

    def dense_up(self) -> torch.Tensor:
        """W_u as the dense block-diagonal ``C x r`` matrix."""
        return torch.block_diag(*self.up_weight.unbind(0))

    def folded(self) -> nn.Linear:
        up = self.dense_up().double()
        eye = torch.eye(self.base.in_features, dtype=torch.float64, device=up.device)
        a = eye + self.scale * up @ self.down.weight.double()  # f(x) = a x + beta
        beta = self.scale * (up @ self.down.bias.double() + self.up_bias.double())
        return fold_affine(self.base, a, beta)


class RepAdapterModel(PetlModel):
    def inject(self) -> None:
        cfg = self.config
        hits = [h for pattern in TARGETS.values() for h in find_modules(self.vit, pattern, nn.Linear)]
        for name, base in hits:
            module = RepAdapterLinear(base, cfg.bottleneck, cfg.groups, cfg.scale)
            module.branch_dropout.p = cfg.dropout
            replace_module(self.vit, name, module)

    def merged(self) -> nn.Module:
        return plain_merged(self, {n: m.folded() for n, m in self.vit.named_modules() if isinstance(m, RepAdapterLinear)})


register_method(MethodSpec("repadapter", RepAdapterModel, RepAdapterConfig, runtime="per_row_adapter", mergeable=True,
                           recipe={"lr": 1.5e-2},  # won on val across the fair basis (bench/recipe_lr.py)
                           bank=BankLayout((RepAdapterLinear,)),
                           # + the lr around the recipe's (registry.LR_MULTIPLES)
                           search_space={"bottleneck": "choice(4,8,16)", "dropout": "uniform(0.0,0.3)"},
                           description="RepAdapter (r=8, groups 2) before qkv and fc1, folds into them exactly"))

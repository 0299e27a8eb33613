"""LoRA (Hu et al., 2021) on the query and value projections of every block.

timm fuses q, k and v into one ``attn.qkv`` Linear (weight rows ``[q; k; v]``, each ``attn_dim``
rows), so LoRA wraps that Linear and adds a low-rank delta to the q and v *slices* only:
``W_q <- W_q + (alpha / rank) B_q A_q`` and likewise ``W_v`` (LoRA paper, Eq. 3: h = W0 x + B A x);
``W_k`` is never touched.

Choices the paper leaves open (ours, as in huggingface/peft): ``A`` kaiming-uniform(a=sqrt(5)),
``B`` zero, so the model equals the frozen backbone at init; no LoRA bias; ``branch_dropout`` acts
on the low-rank delta (the added branch), not on the frozen path. ``targets`` may also include
``k`` for ablations. Mergeable: the deltas fold into a *new* copy of the qkv weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..base import AdapterModule, PetlModel, find_modules, replace_module, row_index
from ..config import MethodConfig, check
from ..registry import BankLayout, MethodSpec, register_method
from .merge import folded_linear, plain_merged

QKV = r"blocks\.\d+\.attn\.qkv"
SLICES = ("q", "k", "v")


@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    rank: int = 8  # r: rank of each B A
    alpha: float = 8.0  # the delta is scaled by alpha / rank
    targets: tuple[str, ...] = ("q", "v")  # which slices of the fused qkv get a delta
    dropout: float = 0.0  # rate of branch_dropout on the delta

    def __post_init__(self):
        check(self.rank >= 1, "rank must be >= 1")
        check(self.alpha > 0, "alpha must be > 0")
        check(len(self.targets) > 0 and all(t in SLICES for t in self.targets),
              f"targets must be a non-empty subset of {SLICES}, got {self.targets}")
        check(len(set(self.targets)) == len(self.targets), f"targets has duplicates: {self.targets}")
        check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")


class LoraQKV(AdapterModule):
    """The frozen fused ``qkv`` Linear plus ``(alpha/rank) B_s A_s`` on each target slice ``s``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, targets: tuple[str, ...]):
        super().__init__()
        if base.out_features % 3:
            raise ValueError(f"qkv Linear has {base.out_features} outputs, not a multiple of 3")
        self.base = base
        self.targets = tuple(t for t in SLICES if t in targets)  # q, k, v order
        self.dim = base.out_features // 3
        self.scaling = alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, base.in_features, **kw)) for t in self.targets})
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(self.dim, rank, **kw)) for t in self.targets})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft / Microsoft's loralib

    def delta_weight(self, t: str) -> torch.Tensor:
        return self.scaling * self.lora_B[t] @ self.lora_A[t]

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def output_delta(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for t in SLICES:
            if t in self.lora_A:
                parts.append(self.scaling * (x @ self.lora_A[t].T) @ self.lora_B[t].T)
            else:
                parts.append(x.new_zeros(()).expand(*x.shape[:-1], self.dim))
        return self.branch_dropout(torch.cat(parts, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.output_delta(x)

    @classmethod
    def add_batched_output_delta(cls, out, mods, x, lengths) -> None:
        """Every row's own ``s B A x`` added into its q / v slice of ``out``: two gathered ``bmm``s
        per slice (tasks of one rank and target set; others take the reference loop)."""
        first = mods[0]
        t0 = first.targets[0]
        if any(m.targets != first.targets or m.lora_A[t0].shape != first.lora_A[t0].shape for m in mods):
            return super().add_batched_output_delta(out, mods, x, lengths)
        h = x.reshape(len(x), -1, x.shape[-1])
        o = out.view(len(out), -1, out.shape[-1])
        if len(mods) == 1:
            a_of = {t: first.lora_A[t].T for t in first.targets}
            b_of = {t: first.lora_B[t].T for t in first.targets}
            scale = first.scaling
        else:
            idx = row_index(lengths, x.device)
            a_of = {t: torch.stack([m.lora_A[t] for m in mods])[idx].transpose(1, 2) for t in first.targets}
            b_of = {t: torch.stack([m.lora_B[t] for m in mods])[idx].transpose(1, 2) for t in first.targets}
            scale = torch.tensor([m.scaling for m in mods], device=x.device, dtype=x.dtype)[idx].view(-1, 1, 1)
        for i, t in enumerate(SLICES):
            if t in a_of:  # [rows, T, in] @ ([rows,] in, r) @ ([rows,] r, dim)
                o[..., i * first.dim:(i + 1) * first.dim] += torch.matmul(torch.matmul(h, a_of[t]), b_of[t]) * scale

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"A_{t}": self.lora_A[t] for t in self.targets}, **{f"B_{t}": self.lora_B[t] for t in self.targets}}

    def bank_static(self) -> tuple:
        return (self.targets, self.dim, self.scaling)

    @classmethod
    def bank_output_delta(cls, mod, out, x, w) -> None:
        """``s B A x`` of every row into its q / v slice: ``[rows, T, in] @ [rows, in, r] @ [rows, r, dim]``."""
        h = x.reshape(len(x), -1, x.shape[-1])
        o = out.view(len(out), -1, out.shape[-1])
        for i, t in enumerate(SLICES):
            if t in mod.targets:
                d = torch.matmul(torch.matmul(h, w[f"A_{t}"].transpose(1, 2)), w[f"B_{t}"].transpose(1, 2))
                o[..., i * mod.dim:(i + 1) * mod.dim] += d * mod.scaling

    def folded(self) -> nn.Linear:
        w = self.base.weight.detach().double().clone()  # new tensor: the frozen one stays untouched
        for i, t in enumerate(SLICES):
            if t in self.lora_A:
                w[i * self.dim:(i + 1) * self.dim] += self.delta_weight(t).detach().double()
        return folded_linear(self.base, w, None if self.base.bias is None else self.base.bias.detach())


class LoraModel(PetlModel):
    def inject(self) -> None:
        cfg = self.config
        hits = find_modules(self.vit, QKV, nn.Linear)
        for name, base in hits:  # all matched first (find_modules), then replaced
            module = LoraQKV(base, cfg.rank, cfg.alpha, cfg.targets)
            module.branch_dropout.p = cfg.dropout
            replace_module(self.vit, name, module)

    def merged(self) -> nn.Module:
        return plain_merged(self, {n: m.folded() for n, m in self.vit.named_modules() if isinstance(m, LoraQKV)})


register_method(MethodSpec("lora", LoraModel, LoraConfig, runtime="per_row_adapter", mergeable=True,
                           recipe={"lr": 1.5e-2},  # won on val across the fair basis (bench/recipe_lr.py)
                           bank=BankLayout((LoraQKV,)),
                           # + the lr around the recipe's (registry.LR_MULTIPLES)
                           search_space={"rank": "choice(4,8,16)", "dropout": "uniform(0.0,0.3)"},
                           description="LoRA rank 8 on the q and v slices of the fused qkv"))

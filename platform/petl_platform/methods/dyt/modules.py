"""DyT parts: the token dispatcher (eq. 3-5), the (MoE-)adapter (eq. 1, 7) and ``DispatchRun``,
the per-forward record of masks, activation rates and the FLOPs that actually ran.

Choices the paper leaves open (all written down here):
- dispatcher init: weight ~ trunc-normal(std 0.02), bias 0 (timm's linear init);
- adapter: no biases (eq. 1 has none), W_down kaiming-uniform (AdaptFormer), W_up zero, so the
  adapter starts as the identity branch 0;
- MoE router: ``alpha = softmax(W_r mean_n(X_n) + b_r)`` where X is the adapter's own input and the
  mean runs over *all* its tokens, class token included (Sec. 3.4 "average pooling across all
  tokens"); softmax normalises the expert weights;
- FLOPs are multiply-accumulates of the linear layers and the two attention matmuls (the paper's
  and fvcore's convention: ViT-B/16 = 17.6 G); norms, activations, softmax and the gather/scatter
  are not counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdapterModule

MODES = ("train", "sparse", "masked", "complete")


class TokenDispatcher(AdapterModule):
    """TD: per-token activation logit ``X W_g`` (W_g in R^{C x 1}, plus a bias), eq. 3.

    An ``AdapterModule`` because it is an injected trainable module; its ``branch_dropout`` stays
    unused: a gate adds no branch to the residual stream."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).squeeze(-1)  # [B, N] logits


class DyTAdapter(AdapterModule):
    """Adapter(X) = ReLU(X W_down) W_up (eq. 1); with ``experts`` > 1 the MoE-adapter of eq. 7:
    the experts' matrices are mixed per image *before* use, so the cost is that of one adapter."""

    def __init__(self, dim: int, bottleneck: int, experts: int = 1):
        super().__init__()
        self.experts = experts
        self.down = nn.Parameter(torch.empty(experts, dim, bottleneck))
        self.up = nn.Parameter(torch.zeros(experts, bottleneck, dim))
        for e in range(experts):  # kaiming-uniform as nn.Linear(dim, bottleneck) would draw it
            bound = 1.0 / math.sqrt(dim)
            nn.init.uniform_(self.down.data[e], -bound, bound)
        self.router = nn.Linear(dim, experts) if experts > 1 else None

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image expert weights alpha [B, experts] from the mean-pooled tokens (Sec. 3.4)."""
        return torch.softmax(self.router(x.mean(dim=1)), dim=-1)

    def mixed_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7: W^moe = sum_i alpha^i W^i, per image: ([B, C, d], [B, d, C])."""
        alpha = self.expert_weights(x).to(self.down.dtype)
        return torch.einsum("be,ecd->bcd", alpha, self.down), torch.einsum("be,edc->bdc", alpha, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            h = F.relu(x @ self.down[0].to(x.dtype)) @ self.up[0].to(x.dtype)
        else:
            down, up = self.mixed_weights(x)
            h = torch.bmm(F.relu(torch.bmm(x, down.to(x.dtype))), up.to(x.dtype))
        return self.branch_dropout(h)

    def macs(self, batch: int, tokens: int) -> int:
        dim, d = self.down.shape[1], self.down.shape[2]
        cost = batch * tokens * 2 * dim * d
        if self.router is not None:  # routing layer + mixing the experts' matrices per image
            cost += batch * dim * self.experts + batch * self.experts * 2 * dim * d
        return cost


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(like).clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def linear_macs(rows: int, module: nn.Module) -> int:
    """MACs of every nn.Linear inside ``module`` applied to ``rows`` tokens."""
    return rows * sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class DispatchRun:
    """State of one forward pass: how masks are made (``mode``, ``ratio``) and what ran.

    Modes: ``train`` (Gumbel-sigmoid + straight-through, dense compute times the mask, eq. 4-5),
    ``sparse`` (eq. 3 threshold, only active tokens are computed: real inference), ``masked``
    (eq. 3 threshold, dense compute times the mask: the reference for ``sparse``), ``complete``
    (no dispatcher: every token through every block, the paper's "complete model").
    ``ratio`` (inference only) replaces the 0.5 threshold: each image keeps its top
    ``round(ratio * T)`` patch tokens by dispatcher score.
    """

    def __init__(self, mode: str, n_prefix: int, tau: float = 5.0, ratio: float | None = None,
                 threshold: float = 0.5):
        self.mode, self.n_prefix, self.tau, self.ratio, self.threshold = mode, n_prefix, tau, ratio, threshold
        self.masks: list[torch.Tensor] = []  # one [B, N] mask per dispatcher call (STE in train mode)
        self.rates: list[float] = []  # measured activation rate over patch tokens, per dispatcher
        self.layer_of: list[int] = []
        self.layer = 0
        self.macs = 0
        self.dense_macs = 0

    @property
    def sparse(self) -> bool:
        return self.mode == "sparse"

    @property
    def counting(self) -> bool:
        return self.mode != "train"  # counting needs host syncs; training does not need it

    def add(self, actual: int, dense: int) -> None:
        if self.counting:
            self.macs += int(actual)
            self.dense_macs += int(dense)

    def mask(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The dispatch mask M [B, N] (float, 1 = active) for ``logits``; ``None`` in complete mode."""
        if self.mode == "complete":
            return None
        if self.mode == "train":
            soft = torch.sigmoid((logits + gumbel_noise(logits) - gumbel_noise(logits)) / self.tau)  # eq. 4
            hard = (soft >= self.threshold).to(soft.dtype)
            m = hard + (soft - soft.detach())  # eq. 5: forward exactly M-bar (adds 0), backward S-bar
        elif self.ratio is not None:
            m = self._top_ratio(logits)
        else:
            m = (torch.sigmoid(logits) >= self.threshold).to(logits.dtype)  # eq. 3
        p = self.n_prefix  # class (and register) tokens always traverse the block
        m = torch.cat([torch.ones_like(m[:, :p]), m[:, p:]], dim=1)
        self.masks.append(m)
        self.layer_of.append(self.layer)
        if self.counting:
            patch = m[:, p:]
            self.rates.append(float(patch.float().mean()) if patch.numel() else 1.0)
        return m

    def _top_ratio(self, logits: torch.Tensor) -> torch.Tensor:
        patch = logits[:, self.n_prefix:]
        k = int(round(self.ratio * patch.shape[1]))
        m = torch.zeros_like(logits)
        if k > 0:
            idx = patch.topk(k, dim=1).indices + self.n_prefix
            m.scatter_(1, idx, 1.0)
        return m

    def rate_tensor(self) -> torch.Tensor:
        """Mean activation of the patch tokens over layers, tokens and batch (L_rate's mean)."""
        p = self.n_prefix
        return torch.stack([m[:, p:].mean() for m in self.masks]).mean()

    def per_layer(self, depth: int) -> list[float]:
        sums, counts = [0.0] * depth, [0] * depth
        for layer, rate in zip(self.layer_of, self.rates):
            sums[layer] += rate
            counts[layer] += 1
        return [s / c if c else 1.0 for s, c in zip(sums, counts)]

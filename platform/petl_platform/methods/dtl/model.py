"""DTL / DTL+ (Fu, Zhu, Wu, AAAI 2024): a Compact Side Network (CSN) beside the frozen ViT.

Notation of the paper (1-based): ``z_1`` = the embedded tokens, ``b_i`` = block i,
``z_{i+1} = b_i(z_i)`` (Eq. 6), CSN layer i is the low-rank map ``w_i = a_i c_i`` and
``h_{i+1} = h_i + z_i w_i`` with ``h_1 = 0`` (Eq. 5). From block M on the block output is
adapted: ``z'_{i+1} = z_{i+1} + theta(h_{i+1})`` for ``i >= M`` (Eq. 7/8, DTL) or
``z_{i+1} + g(theta(h_{i+1}))`` (Eq. 9, DTL+), theta = Swish with beta = 100.

Choices (the paper, and the authors' released ViT code where the paper is silent):

- Which z feeds CSN layer i: the tensor that actually enters block i, i.e. the *adapted*
  ``z'_i`` once adaptation has started (Fig. 2: "applied to the input features" of each block).
  Before block M+1 this is the untouched frozen state.
- Which blocks get the add-back: blocks M..N (1-based), so M = 7 on a 12-block ViT adapts
  blocks 7..12 ("half of the later blocks"), M = 1 is the paper's DTL+*.
- There are N CSN layers (one per block, all used: layer N feeds the add-back after block N).
- ``a_i`` uniform in +-1/sqrt(C) (the default of a C -> d' linear map), ``c_i`` zero, so at
  init h = 0, theta(0) = 0 and the model equals the frozen backbone + head.
- DTL+'s g: one depthwise conv (groups = C, stride 1, 'same' zero padding, no bias) shared by
  all CSN layers, on the patch tokens laid on the backbone's ``patch_embed.grid_size``. The
  paper's "+0.01 M parameters" for g rules out a dense C x C pointwise conv (0.59 M on
  ViT-B); ``pointwise=True`` adds one (bias-free, so init stays exact) for the literal
  depthwise-separable reading. Prefix tokens (class/register) get theta(h) without g.
- Sharing and memory: ``b_M`` itself runs on the frozen ``z_M`` and only its *output* is
  adapted, so blocks 1..M are bitwise the frozen backbone: ``shared_prefix_blocks = M`` and all
  of them run under ``torch.no_grad()`` ("no gradients are back propagated to the first M
  blocks"). The tail replays the CSN over the stored trunk states (cheap, per task), adds
  theta(h_{M+1}) to block M's output and runs blocks M+1..N with autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PetlError
from ..base import AdapterModule, PetlModel


class CsnLayer(AdapterModule):
    """One CSN layer: the low-rank map ``z -> z a c`` of Eq. 5 (``branch_dropout`` on the delta)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.a = nn.Parameter(torch.empty(dim, rank).uniform_(-bound, bound))
        self.c = nn.Parameter(torch.zeros(rank, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.branch_dropout((z @ self.a) @ self.c)


class GridConv(nn.Module):
    """DTL+'s g (Eq. 9): depthwise (optionally + pointwise) conv over the patch-token grid."""

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int, kernel_size: int, pointwise: bool):
        super().__init__()
        self.grid, self.prefix = (int(grid[0]), int(grid[1])), int(prefix)
        self.depthwise = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim, bias=False)
        self.pointwise = nn.Conv2d(dim, dim, 1, bias=False) if pointwise else None

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        (gh, gw), p = self.grid, self.prefix
        b, n, c = t.shape
        if n - p != gh * gw:
            raise PetlError(f"DTL+ expects {p} prefix tokens + a {gh}x{gw} patch grid ({p + gh * gw} tokens), "
                            f"got {n} tokens; feed images of the backbone's img_size")
        grid = t[:, p:].transpose(1, 2).reshape(b, c, gh, gw)
        grid = self.depthwise(grid)
        if self.pointwise is not None:
            grid = self.pointwise(grid)
        return torch.cat([t[:, :p], grid.flatten(2).transpose(1, 2)], dim=1)


class DtlModel(PetlModel):
    """DTL: CSN layers live at ``vit.blocks.{i}.dtl_csn`` (so ``adapter_modules`` finds them);
    the frozen blocks themselves are never replaced."""

    use_conv = False

    def inject(self) -> None:
        cfg, depth = self.config, self.depth
        if not 1 <= cfg.m <= depth:
            raise PetlError(f"{self.method}: m={cfg.m} is out of range for a backbone with {depth} blocks; "
                            f"use 1 <= m <= {depth} (m is the 1-based first block whose output is adapted)")
        dim = self.vit.embed_dim
        for blk in self.vit.blocks:
            blk.dtl_csn = CsnLayer(dim, cfg.rank)
        self.fusion = None
        if self.use_conv:
            self.fusion = GridConv(dim, self.vit.patch_embed.grid_size, self.vit.num_prefix_tokens,
                                   cfg.kernel_size, cfg.pointwise)

    @property
    def shared_prefix_blocks(self) -> int:
        return self.config.m  # blocks 1..M compute the frozen backbone; b_M's output is adapted in the tail

    def tail_inputs(self) -> list[int]:
        return list(range(self.shared_prefix_blocks + 1))  # the CSN reads z_1..z_M, the tail starts at z_{M+1}

    def add_back(self, h: torch.Tensor) -> torch.Tensor:
        """theta(h) (Eq. 7/8) or g(theta(h)) (Eq. 9); theta(x) = x * sigmoid(beta x), computed as
        silu(beta x) / beta: the same function, but autograd keeps one tensor instead of two."""
        beta = self.config.beta
        t = F.silu(beta * h) / beta
        return self.fusion(t) if self.fusion is not None else t

    def _tail_blocks(self, states: list[torch.Tensor]) -> torch.Tensor:
        k, m, blocks = len(states) - 1, self.config.m, self.vit.blocks
        if k != self.shared_prefix_blocks:
            raise PetlError(f"{self.method}: forward_tail needs the {self.shared_prefix_blocks + 1} trunk states "
                            f"z_0..z_{self.shared_prefix_blocks}, got {k + 1}")
        h = 0
        for i in range(k):  # Eq. 5 over the frozen trunk: h_{k+1} = sum_i z_i a_i c_i
            h = h + blocks[i].dtl_csn(states[i])
        x = states[k]
        if k >= m:  # Eq. 8: block k = M is adapted
            x = x + self.add_back(h)
        for i in range(k, len(blocks)):
            h = h + blocks[i].dtl_csn(x)  # Eq. 5 on the adapted input z'_i
            x = blocks[i](x)  # Eq. 6
            if i + 1 >= m:  # Eq. 8 / 9 (1-based block i+1 >= M)
                x = x + self.add_back(h)
        return x

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks 1..M without autograd (the memory saving), then the tail; the exact same ops as
        ``forward_tail(prefix_states(x))``. Consequence: no gradient reaches the input image
        through blocks 1..M (use another method for input saliency)."""
        states = [x]
        with torch.no_grad():
            for blk in self.vit.blocks[:self.shared_prefix_blocks]:
                states.append(blk(states[-1]))
        return self._tail_blocks(states)

    def forward_tail(self, states: list[torch.Tensor]) -> torch.Tensor:
        return self.forward_head(self.vit.norm(self._tail_blocks(states)))


class DtlPlusModel(DtlModel):
    """DTL+: DTL + one shared grid conv g after theta (Eq. 9)."""

    use_conv = True


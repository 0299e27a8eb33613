"""``DyTBlock``: a frozen timm ``Block`` with token dispatcher(s) and parallel adapter(s).

The four variants of Sec. 3.3 / Fig. 3 (``Block`` in eq. 2 is the residual branch it skips):

- ``mlp`` (default, "MLP Dispatch"): X' = X + Attn(LN(X)) on all tokens;
  X_out = X' + Adapter(X') + M * MLP(LN(X')), M = TD(X').
- ``attn`` ("Attention Dispatch"): M = TD(X); self-attention runs among the active tokens only
  (inactive tokens are neither queries nor keys); X' = X + Adapter(X) + M * Attn(LN(X));
  X_out = X' + MLP(LN(X')) on all tokens.
- ``attn_mlp`` ("Attention-MLP Dispatch"): the ``attn`` step then the ``mlp`` step, with their
  own dispatchers and adapters (twice the adapter parameters, as the paper notes).
- ``layer`` ("Layer Dispatch"): one TD before the layer; active tokens run the whole layer
  (attention among active tokens, then the MLP); X_out = X + Adapter(X) + M * (Layer(X) - X).

Training multiplies the dense branch output by the straight-through mask (eq. 5); attention
variants additionally hide inactive tokens as keys with the hard mask. Inference (``sparse``)
gathers the active tokens of the whole batch: one flat ``index_select`` for the MLP, a padded
per-image gather (longest image sets the length, a key-padding mask hides the padding) for
attention, and ``index_add`` scatters the results back.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import DispatchRun, DyTAdapter, TokenDispatcher, linear_macs

VARIANTS = ("mlp", "attn", "attn_mlp", "layer")
_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def flat_index(m: torch.Tensor) -> torch.Tensor:
    """Indices of the active tokens of a [B, N] mask in the flattened [B*N] token list."""
    return (m.reshape(-1) > 0.5).nonzero().squeeze(1)


def _padded_index(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image active token positions, active first in original order, padded to the longest:
    (``order`` [B, K], ``valid`` [B, K] bool)."""
    active = m > 0.5
    counts = active.sum(dim=1)
    k = int(counts.max())
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=m.device)[None, :] < counts[:, None]
    return order, valid


class DyTBlock(nn.Module):
    """One ViT block with DyT dispatch; the frozen parts keep their timm names (``attn``, ``mlp``)."""

    def __init__(self, block: nn.Module, dim: int, bottleneck: int, experts: int, dispatch: str):
        super().__init__()
        for name in _PARTS:
            setattr(self, name, getattr(block, name))
        self.dispatch = dispatch
        n = 2 if dispatch == "attn_mlp" else 1
        self.dispatcher = nn.ModuleList(TokenDispatcher(dim) for _ in range(n))
        self.adapter = nn.ModuleList(DyTAdapter(dim, bottleneck, experts) for _ in range(n))

    # ------------------------------------------------------------ frozen residual branches
    def attn_branch(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if keys is None else keys[:, None, None, :]
        return self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=mask)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _layer_branch(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn_branch(x, keys)
        return a + self.mlp_branch(x + a)

    # ------------------------------------------------------------ cost bookkeeping
    def attn_macs(self, batch: int, tokens: int) -> int:
        return linear_macs(batch * tokens, self.attn) + 2 * batch * tokens * tokens * self.attn.qkv.out_features // 3

    def adapter_out(self, i: int, x: torch.Tensor, run: DispatchRun) -> torch.Tensor:
        b, n, c = x.shape
        run.add(self.adapter[i].macs(b, n), self.adapter[i].macs(b, n))
        return self.adapter[i](x)

    def dispatch_mask(self, i: int, x: torch.Tensor, run: DispatchRun) -> torch.Tensor | None:
        if run.mode == "complete":
            return None
        b, n, c = x.shape
        run.add(b * n * c, 0)  # the dispatcher's C -> 1 projection
        return run.mask(self.dispatcher[i](x))

    # ------------------------------------------------------------ dispatch steps
    def _mlp_step(self, i: int, x: torch.Tensor, run: DispatchRun) -> torch.Tensor:
        """X + Adapter(X) + M * MLP(LN(X)) (eq. 6 with Block = MLP)."""
        b, n, c = x.shape
        base = x + self.adapter_out(i, x, run)
        m = self.dispatch_mask(i, x, run)
        dense = linear_macs(b * n, self.mlp)
        if m is None or not run.sparse:
            run.add(dense, dense)
            y = self.mlp_branch(x)
            return base + (y if m is None else m.unsqueeze(-1) * y)
        idx = flat_index(m)
        run.add(linear_macs(idx.numel(), self.mlp), dense)
        y = self.mlp_branch(x.reshape(b * n, c).index_select(0, idx))
        return base.reshape(b * n, c).index_add_(0, idx, y.to(base.dtype)).reshape(b, n, c)

    def _attn_step(self, i: int, x: torch.Tensor, run: DispatchRun, layer: bool = False) -> torch.Tensor:
        """X + Adapter(X) + M * Block(LN(X)) with Block = Attn (or the whole layer), attention
        restricted to the active tokens."""
        b, n, c = x.shape
        branch = self._layer_branch if layer else self.attn_branch
        base = x + self.adapter_out(i, x, run)
        m = self.dispatch_mask(i, x, run)
        dense = self.attn_macs(b, n) + (linear_macs(b * n, self.mlp) if layer else 0)
        if m is None or not run.sparse:
            run.add(dense, dense)
            if m is None:
                return base + branch(x)
            return base + m.unsqueeze(-1) * branch(x, m.detach() > 0.5)
        order, valid = _padded_index(m)
        k = order.shape[1]
        if k == 0:  # no active token at all (only possible without class/prefix tokens)
            return base
        z = x.gather(1, order.unsqueeze(-1).expand(-1, -1, c))
        a = self.attn_branch(z, None if k * b == int(m.sum()) else valid)  # no padding: no mask
        run.add(self.attn_macs(b, k), dense)
        flat = (order + torch.arange(b, device=x.device)[:, None] * n)[valid]
        y = a[valid]
        if layer:  # the MLP of the layer runs on the active tokens only, gathered flat
            run.add(linear_macs(y.shape[0], self.mlp), 0)
            y = y + self.mlp_branch(z[valid] + y)
        return base.reshape(b * n, c).index_add_(0, flat, y.to(base.dtype)).reshape(b, n, c)

    def forward(self, x: torch.Tensor, run: DispatchRun) -> torch.Tensor:
        if self.dispatch == "mlp":
            b, n, _ = x.shape
            run.add(self.attn_macs(b, n), self.attn_macs(b, n))
            return self._mlp_step(0, x + self.attn_branch(x), run)
        if self.dispatch == "attn":
            x = self._attn_step(0, x, run)
            b, n, _ = x.shape
            run.add(linear_macs(b * n, self.mlp), linear_macs(b * n, self.mlp))
            return x + self.mlp_branch(x)
        if self.dispatch == "attn_mlp":
            return self._mlp_step(1, self._attn_step(0, x, run), run)
        return self._attn_step(0, x, run, layer=True)

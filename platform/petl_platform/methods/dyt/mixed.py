"""Cross-task token dispatch: several DyT task models (MLP dispatch) answered in one pass where,
at every layer, the frozen attention runs once over all tasks' images and the active tokens of
*all* tasks go through ONE frozen MLP call (gathered flat, scattered back per task). The frozen
weights are the backbone's, identical for every task on it; only dispatchers, adapters and heads
differ. Results equal each task's own ``infer`` (tested)."""

from __future__ import annotations

import torch

from ...errors import PetlError
from .block import flat_index
from .modules import linear_macs


@torch.no_grad()
def infer_mixed(models: list, xs: list[torch.Tensor], ratios: list[float | None]) -> list[tuple[torch.Tensor, dict]]:
    """``[(logits, stats), ...]`` per ``(model, x, ratio)``; ``stats`` as ``DyTModel.last_stats``."""
    if not models:
        return []
    first = models[0]
    for m in models:
        if m.config.dispatch != "mlp":
            raise PetlError(f"cross-task dispatch needs MLP dispatch; {m.method} uses {m.config.dispatch!r}")
        if m.backbone_fingerprint != first.backbone_fingerprint:
            raise PetlError("cross-task dispatch needs every task on the same backbone")
    for m in models:
        m.eval()
    runs = [m.new_run("sparse", r) for m, r in zip(models, ratios)]
    hs = [m.embed(x) for m, x in zip(models, xs)]
    sizes = [h.shape[0] for h in hs]
    n, c = hs[0].shape[1], hs[0].shape[2]
    for layer, blk0 in enumerate(first.vit.blocks):
        # frozen attention once over every task's images (attention is per image)
        h_all = torch.cat(hs)
        h_all = h_all + blk0.attn_branch(h_all)
        hs = list(h_all.split(sizes))
        bases, picks = [], []
        for m, h, run in zip(models, hs, runs):
            run.layer = layer
            blk = m.vit.blocks[layer]
            b = h.shape[0]
            run.add(blk.attn_macs(b, n), blk.attn_macs(b, n))
            bases.append(h + blk.adapter_out(0, h, run))
            idx = flat_index(blk.dispatch_mask(0, h, run))
            run.add(linear_macs(idx.numel(), blk.mlp), linear_macs(b * n, blk.mlp))
            picks.append(idx)
        tokens = torch.cat([h.reshape(-1, c).index_select(0, idx) for h, idx in zip(hs, picks)])
        y_all = blk0.mlp_branch(tokens)  # ONE frozen MLP call for the active tokens of all tasks
        ys = y_all.split([idx.numel() for idx in picks])
        hs = [base.reshape(-1, c).index_add_(0, idx, y.to(base.dtype)).reshape(base.shape)
              for base, idx, y in zip(bases, picks, ys)]
    out = []
    for m, h, run, b in zip(models, hs, runs, sizes):
        logits = m.forward_head(m.vit.norm(h))
        m.record_stats(run, b, n - m.vit.num_prefix_tokens)
        out.append((logits, m.last_stats()))
    return out


def infer_many(models: list, xs: list[torch.Tensor], ratios: list[float | None]) -> list[tuple[torch.Tensor, dict]]:
    """``infer_mixed`` when every model dispatches before the MLP, else each model's own ``infer``."""
    if all(m.config.dispatch == "mlp" for m in models):
        return infer_mixed(models, xs, ratios)
    return [m.infer(x, ratio=r) for m, x, r in zip(models, xs, ratios)]

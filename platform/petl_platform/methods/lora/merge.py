"""Folding helpers shared by the mergeable re-parameterisable methods (LoRA, RepAdapter, ARC).

``plain_merged`` turns a model whose injected modules all wrap a frozen ``nn.Linear`` into a plain
linear-probe-shaped model: same ``model(x) -> logits`` contract, no ``AdapterModule`` left, the
wrapped linears replaced by new ``nn.Linear``s carrying the folded weights. The shared frozen
tensors are never written to: folded weights are always new tensors. The merged model is for
inference (its ``method`` reads ``<method>:merged``); save the unmerged model's adapter instead.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..base import AdapterModule, replace_module, share_frozen


def folded_linear(base: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new frozen ``nn.Linear`` shaped like ``base`` holding ``weight`` / ``bias`` (cast to its dtype)."""
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None,
                    device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(base.weight.dtype))
        if bias is not None:
            out.bias.copy_(bias.to(base.weight.dtype))
    return out.requires_grad_(False)


def plain_merged(model, folded: dict[str, nn.Module]) -> nn.Module:
    """A linear-probe model over a copy of ``model.vit`` where each ``name -> module`` in ``folded``
    replaces the injected wrapper at that name; the head is a copy of ``model.head``."""
    from ..linear import LinearConfig, LinearProbe  # local: linear imports the registry, not us

    vit = share_frozen(model.vit)  # new tree, same tensors (adapter tensors too, until replaced)
    for name, module in folded.items():
        replace_module(vit, name, module)
    left = [n for n, m in vit.named_modules() if isinstance(m, AdapterModule)]
    if left:  # a wrapper this method does not fold: a bug, never silently half-merged
        raise RuntimeError(f"merging {model.method} left injected modules behind: {left[:3]}")
    merged = LinearProbe(vit, model.num_classes, LinearConfig(), f"{model.method}:merged")
    merged.head = copy.deepcopy(model.head)
    merged.backbone_name, merged.backbone_fingerprint = model.backbone_name, model.backbone_fingerprint
    return merged.train(model.training)


def fold_affine(base: nn.Linear, a: torch.Tensor, beta: torch.Tensor) -> nn.Linear:
    """Fold a preceding affine map ``y = a x + beta`` into ``base``: ``W' = W a``, ``b' = W beta + b``
    (computed in float64, returned as a new Linear in ``base``'s dtype)."""
    w = base.weight.detach().double()
    bias = w @ beta.detach().double()
    if base.bias is not None:
        bias = bias + base.bias.detach().double()
    return folded_linear(base, w @ a.detach().double(), bias)

"""Method-specific checks for LoRA, Adapter, RepAdapter and ARC (the generic ones are in
test_method_matrix.py): where each method acts, the shapes it keeps, and closed-form parameter
counts on the tiny config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petl_platform import PetlError, build_model
from petl_platform.methods import AdapterModule
from petl_platform.methods.adapter import ParallelAdapterMlp
from petl_platform.methods.arc import ArcLinear
from petl_platform.methods.lora import LoraQKV
from petl_platform.methods.repadapter import RepAdapterLinear

C, L, MLP_HIDDEN = 64, 4, 256  # the tiny_backbone fixture: width, depth, 4 x width MLP


def perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def closed_form(method: str, **hp) -> int:
    """Trainable parameters (head excluded) on a ViT of width C and depth L."""
    if method == "lora":
        r = hp.get("rank", 8)
        return L * len(hp.get("targets", ("q", "v"))) * 2 * r * C  # A: r x C, B: C x r per slice
    if method == "adapter":
        d = hp.get("bottleneck", 8)
        return L * (C * d + d + d * C + C)  # W_down, b_down, W_up, b_up
    if method == "repadapter":
        r, g = hp.get("bottleneck", 8), hp.get("groups", 2)
        return 2 * L * (C * r + r + C * r // g + C)  # two paths; grouped W_u has C * r / g weights
    if method in ("arc", "arc_att"):
        r, paths = hp["rank"], 2 if method == "arc" else 1
        return paths * (C * r + L * (r + C))  # shared W_down per path + per-layer c^(l) and bias
    raise KeyError(method)


@pytest.mark.parametrize("method,hp", [
    ("lora", {}), ("lora", {"rank": 4, "targets": ["q", "k", "v"]}),
    ("adapter", {}), ("adapter", {"bottleneck": 16}),
    ("repadapter", {}), ("repadapter", {"bottleneck": 12, "groups": 4}),
    ("arc", {"rank": 8}), ("arc_att", {"rank": 8}), ("arc", {"rank": 64}),
])
def test_trainable_counts_match_closed_form(method, hp, tiny_backbone):
    model = build_model(method, tiny_backbone, 3, **hp)
    assert model.num_trainable() == closed_form(method, **hp)


# ------------------------------------------------------------------ LoRA
def test_lora_touches_q_and_v_never_k(tiny_backbone):
    model = build_model("lora", tiny_backbone, 3)
    mods = [m for m in model.vit.modules() if isinstance(m, LoraQKV)]
    assert len(mods) == L and all(set(m.lora_A) == {"q", "v"} for m in mods)
    qkv = mods[0]
    with torch.no_grad():
        for b in qkv.lora_B.values():
            b.normal_()
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        base, out = qkv.base(x), qkv(x)
    q, k, v = (slice(i * C, (i + 1) * C) for i in range(3))
    torch.testing.assert_close(out[..., k], base[..., k], rtol=0, atol=0)
    assert (out[..., q] - base[..., q]).abs().max() > 1e-3
    assert (out[..., v] - base[..., v]).abs().max() > 1e-3


def test_lora_fold_is_scaled_delta_on_q_v_rows(tiny_backbone):
    model = build_model("lora", tiny_backbone, 3, rank=4, alpha=8.0)
    perturb(model)
    qkv = next(m for m in model.vit.modules() if isinstance(m, LoraQKV))
    folded, w = qkv.folded(), qkv.base.weight
    assert folded.weight.data_ptr() != w.data_ptr()
    expect_q = w[:C] + 2.0 * qkv.lora_B["q"] @ qkv.lora_A["q"]  # alpha / rank = 2
    torch.testing.assert_close(folded.weight[:C], expect_q.detach(), rtol=0, atol=1e-6)
    assert torch.equal(folded.weight[C:2 * C], w[C:2 * C])


def test_lora_rejects_unknown_target(tiny_backbone):
    with pytest.raises(PetlError, match="targets"):
        build_model("lora", tiny_backbone, 3, targets=["q", "o"])


# ------------------------------------------------------------------ Adapter
def test_adapter_branch_sits_beside_the_mlp(tiny_backbone):
    model = build_model("adapter", tiny_backbone, 3, scale=0.1)
    perturb(model)
    blk = model.vit.blocks[0]
    assert isinstance(blk.norm2, nn.Identity) and isinstance(blk.mlp, ParallelAdapterMlp)
    ad, x = blk.mlp, torch.randn(2, 5, C)
    with torch.no_grad():
        expect = ad.mlp(ad.norm(x)) + 0.1 * ad.up(torch.relu(ad.down(x)))  # X' feeds the adapter
        torch.testing.assert_close(ad(x), expect, rtol=0, atol=1e-6)
        ad.on_norm = True  # adapter_input="ln": the paper's equation
        expect_ln = ad.mlp(ad.norm(x)) + 0.1 * ad.up(torch.relu(ad.down(ad.norm(x))))
        torch.testing.assert_close(ad(x), expect_ln, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ RepAdapter
def test_repadapter_groupwise_up_projection(tiny_backbone):
    model = build_model("repadapter", tiny_backbone, 3, bottleneck=8, groups=2)
    perturb(model)
    mods = [(n, m) for n, m in model.vit.named_modules() if isinstance(m, RepAdapterLinear)]
    assert sorted({n.split(".", 2)[2] for n, _ in mods}) == ["attn.qkv", "mlp.fc1"] and len(mods) == 2 * L
    ra = mods[0][1]
    assert tuple(ra.up_weight.shape) == (2, C // 2, 4)
    dense = ra.dense_up()
    assert dense.shape == (C, 8) and dense[:C // 2, 4:].abs().sum() == 0 and dense[C // 2:, :4].abs().sum() == 0
    x = torch.randn(2, 5, C)
    with torch.no_grad():  # the paper's grouped 1x1 conv gives the same branch
        h = ra.down(x).transpose(1, 2)
        conv = F.conv1d(h, ra.up_weight.reshape(C, 4, 1), ra.up_bias, groups=2).transpose(1, 2)
        torch.testing.assert_close(ra.branch(x), ra.scale * conv, rtol=0, atol=1e-6)


def test_repadapter_bad_groups(tiny_backbone):
    with pytest.raises(PetlError, match="groups"):
        build_model("repadapter", tiny_backbone, 3, bottleneck=8, groups=3)


# ------------------------------------------------------------------ ARC
@pytest.mark.parametrize("method,paths", [("arc", 2), ("arc_att", 1)])
def test_arc_shares_one_matrix_per_path(method, paths, tiny_backbone):
    model = build_model(method, tiny_backbone, 3, rank=8)
    shared = [n for n, p in model.named_parameters() if p.requires_grad and tuple(p.shape) == (C, 8)]
    assert len(shared) == paths
    mods = [(n, m) for n, m in model.vit.named_modules() if isinstance(m, ArcLinear)]
    assert len(mods) == paths * L
    assert ("mlp.fc1" in " ".join(n for n, _ in mods)) == (method == "arc")
    for path in ("attn", "mlp")[:paths]:
        ptrs = {m.down.data_ptr() for _, m in mods if m.path == path}
        assert len(ptrs) == 1
    saved = [k for k in model.trainable_state_dict() if k.startswith("arc.")]
    assert len(saved) == paths  # each shared matrix stored once


def test_arc_rank_above_width_is_refused(tiny_backbone):
    with pytest.raises(PetlError, match=f"rank 65 exceeds the backbone width {C}"):
        build_model("arc", tiny_backbone, 3, rank=65)


def test_arc_fold_formula(tiny_backbone):
    model = build_model("arc_att", tiny_backbone, 3, rank=8)
    perturb(model)
    m = next(m for m in model.vit.modules() if isinstance(m, ArcLinear))
    d, c = m.down.detach(), m.coef.detach()
    w1 = m.base.weight @ (d @ torch.diag(c) @ d.T + torch.eye(C))  # W1' = (W_down C W_up + I) W1
    torch.testing.assert_close(m.folded().weight, w1, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ shared properties
@pytest.mark.parametrize("method,hp", [("lora", {}), ("adapter", {}), ("repadapter", {}),
                                       ("arc", {"rank": 8}), ("arc_att", {"rank": 8})])
def test_branch_dropout_acts_on_the_added_branch_only(method, hp, tiny_backbone, images):
    model = build_model(method, tiny_backbone, 3, **hp)
    perturb(model)
    mods = [m for m in model.vit.modules() if isinstance(m, AdapterModule)]
    assert mods
    for m in mods:
        m.branch_dropout.p = 1.0  # drops the whole branch: only the frozen path is left
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), tiny_backbone.forward_features(images),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,hp", [("lora", {}), ("repadapter", {}), ("arc", {"rank": 8}), ("arc_att", {"rank": 8})])
def test_merged_adds_no_parameters(method, hp, tiny_backbone):
    model = build_model(method, tiny_backbone, 3, **hp)
    merged = model.merged()
    plain = sum(p.numel() for p in tiny_backbone.parameters()) + sum(p.numel() for p in model.head.parameters())
    assert sum(p.numel() for p in merged.parameters()) == plain
    assert merged.num_trainable() == 0

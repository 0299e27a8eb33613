"""DTL / DTL+: frozen prefix, add-back equations, grid conv, memory-relevant autograd, counts."""

import pytest
import torch
import torch.nn.functional as F

from petl_platform import PetlError, build_model, create_backbone, load_adapter, save_adapter
from petl_platform.methods import adapter_modules, get_method, run_trunk
from petl_platform.methods.dtl import CsnLayer


def _randomize(model, seed=0):
    """Non-zero c (and a fresh head) so the CSN add-back is active, not the identity of init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _reference(model, x):
    """The paper's Eq. 5-9 written out directly (1-based i; z_1 = embedded tokens)."""
    vit, cfg, blocks = model.vit, model.config, model.vit.blocks
    z = run_trunk(vit, x, 0)[0]
    h = torch.zeros_like(z)
    theta = lambda t: t / (1 + torch.exp(-cfg.beta * t))  # noqa: E731  Swish, Eq. 7
    for i in range(1, len(blocks) + 1):
        csn = blocks[i - 1].dtl_csn
        h = h + z @ csn.a @ csn.c  # Eq. 5
        z = blocks[i - 1](z)  # Eq. 6
        if i >= cfg.m:  # Eq. 8
            add = theta(h)
            if model.fusion is not None:  # Eq. 9: depthwise conv on the patch grid
                p, (gh, gw) = vit.num_prefix_tokens, vit.patch_embed.grid_size
                grid = add[:, p:].reshape(len(x), gh, gw, -1).permute(0, 3, 1, 2)
                w = model.fusion.depthwise.weight
                grid = F.conv2d(grid, w, padding=w.shape[-1] // 2, groups=w.shape[0])
                add = torch.cat([add[:, :p], grid.permute(0, 2, 3, 1).reshape(len(x), gh * gw, -1)], 1)
            z = z + add
    return model.forward_head(vit.norm(z))


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_registered_and_not_mergeable(method):
    spec = get_method(method)
    assert spec.shares_trunk and not spec.mergeable


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_blocks_before_m_are_bitwise_frozen(method, tiny_backbone8, images):
    model = _randomize(build_model(method, tiny_backbone8, 3, m=3))
    frozen = run_trunk(tiny_backbone8, images, 8)
    seen = {}
    hooks = [blk.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out))
             for i, blk in enumerate(model.vit.blocks)]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for i in range(3):  # blocks 1..M compute exactly the backbone
        assert torch.equal(seen[i], frozen[i + 1]), f"block {i + 1} differs from the frozen backbone"
    assert not torch.allclose(seen[3], frozen[4]), "block M+1 should see the adapted z'_{M+1}"
    states = model.prefix_states(images)
    assert model.shared_prefix_blocks == 3 and model.tail_inputs() == [0, 1, 2, 3]
    assert len(states) == 4 and all(torch.equal(s, f) for s, f in zip(states, frozen))


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_forward_equals_tail_of_prefix_and_paper_equations(method, m, tiny_backbone8, images):
    model = _randomize(build_model(method, tiny_backbone8, 3, m=m), seed=m)
    with torch.no_grad():
        out = model(images)
        assert torch.equal(out, model.forward_tail(model.prefix_states(images)))
        torch.testing.assert_close(out, _reference(model, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_init_equals_frozen_features(method, tiny_backbone8, images):
    model = build_model(method, tiny_backbone8, 3, m=2).eval()
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), tiny_backbone8.forward_features(images))


@pytest.mark.parametrize("img_size,grid", [(48, (12, 12)), ((32, 48), (8, 12)), (32, (8, 8))])
def test_dtl_plus_grid_comes_from_backbone(img_size, grid):
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", img_size=img_size, patch_size=4, depth=3, embed_dim=32, num_heads=2)
    model = _randomize(build_model("dtl_plus", bb, 2, m=2))
    assert model.fusion.grid == grid and model.fusion.prefix == bb.num_prefix_tokens
    hw = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 2)
        torch.testing.assert_close(out, _reference(model, x), rtol=1e-5, atol=1e-5)


def test_grid_conv_is_size_preserving_and_spatial(tiny_backbone):
    model = build_model("dtl_plus", tiny_backbone, 2, m=1)
    g = model.fusion
    with torch.no_grad():
        g.depthwise.weight.fill_(1.0)
    t = torch.zeros(1, 65, 64)
    t[0, 0] = 5.0  # class token: passes g unchanged
    t[0, 1 + 3 * 8 + 4] = 1.0  # patch at row 3, col 4
    out = g(t)
    assert out.shape == t.shape
    assert torch.equal(out[0, 0], t[0, 0])
    lit = (out[0, 1:, 0] != 0).nonzero().flatten().tolist()
    assert lit == [r * 8 + c for r in (2, 3, 4) for c in (3, 4, 5)]  # its 3x3 neighbourhood
    with pytest.raises(PetlError, match="8x8 patch grid"):
        g(torch.zeros(1, 50, 64))


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_gradients_reach_csn_and_early_blocks_have_no_graph(method, tiny_backbone8, images):
    model = build_model(method, tiny_backbone8, 3, m=3).train()
    y = torch.tensor([0, 1, 2, 0])
    graph = {}
    hooks = [blk.register_forward_hook(lambda mod, inp, out, i=i: graph.__setitem__(i, (out.requires_grad, out.grad_fn)))
             for i, blk in enumerate(model.vit.blocks)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        opt.zero_grad()
        loss = model.training_step(images, y, 0.0).loss
        loss.backward()
        layers = [blk.dtl_csn for blk in model.vit.blocks]
        if step == 0:  # c is zero-init, so only c (and the head) get a gradient at the first step
            assert all(layer.c.grad is not None and layer.c.grad.abs().sum() > 0 for layer in layers)
        else:
            assert all(layer.a.grad.abs().sum() > 0 and layer.c.grad.abs().sum() > 0 for layer in layers)
            if model.fusion is not None:
                assert model.fusion.depthwise.weight.grad.abs().sum() > 0
        opt.step()
    for h in hooks:
        h.remove()
    for i in range(3):  # blocks 1..M: no autograd graph at all
        assert graph[i] == (False, None), f"block {i + 1} built an autograd graph"
    assert graph[3][0] and graph[3][1] is not None  # the tail trains through blocks M+1..N
    assert all(p.grad is None for n, p in model.vit.named_parameters() if "dtl_csn" not in n)


def test_m_validation(tiny_backbone):
    with pytest.raises(PetlError, match=r"m=5 is out of range for a backbone with 4 blocks; use 1 <= m <= 4"):
        build_model("dtl", tiny_backbone, 3, m=5)
    with pytest.raises(PetlError, match="m must be >= 1"):
        build_model("dtl_plus", tiny_backbone, 3, m=0)
    with pytest.raises(PetlError, match="kernel_size must be odd"):
        build_model("dtl_plus", tiny_backbone, 3, m=1, kernel_size=4)
    with pytest.raises(PetlError, match="has no hyperparameter 'kernel_size'"):
        build_model("dtl", tiny_backbone, 3, kernel_size=3)


@pytest.mark.parametrize("method,hp,extra", [("dtl", {}, 0), ("dtl", {"rank": 4}, 0), ("dtl_plus", {}, 64 * 9),
                                             ("dtl_plus", {"kernel_size": 5, "pointwise": True}, 64 * 25 + 64 * 64)])
def test_trainable_param_count_formula(method, hp, extra, tiny_backbone):
    model = build_model(method, tiny_backbone, 7, m=2, **hp)
    n, c, r = 4, 64, hp.get("rank", 2)
    assert model.num_trainable() == n * 2 * c * r + extra  # N maps a_i (C x d') + c_i (d' x C) (+ g)
    assert sum(p.numel() for p in model.head.parameters()) == 64 * 7 + 7


def test_param_count_vit_b_matches_paper_order():
    bb = create_backbone("vit_base_patch16_224")
    dtl, plus = build_model("dtl", bb, 10), build_model("dtl_plus", bb, 10)
    assert dtl.num_trainable() == 12 * 2 * 768 * 2 == 36_864  # paper: 0.04 M
    assert plus.num_trainable() == 36_864 + 768 * 9 == 43_776  # paper: 0.05 M
    assert dtl.shared_prefix_blocks == 7  # M = 7: blocks 1..7 are the frozen backbone


def test_adapter_modules_and_branch_dropout(tiny_backbone, images):
    model = _randomize(build_model("dtl", tiny_backbone, 3, m=1))
    mods = adapter_modules(model.vit, 2)
    assert len(mods) == 1 and isinstance(mods[0], CsnLayer)
    with torch.no_grad():
        ref = model(images)
        for i in range(4):
            adapter_modules(model.vit, i)[0].branch_dropout.p = 0.5
        assert torch.equal(model(images), ref)  # eval: dropout is the identity
        model.train()
        assert not torch.allclose(model(images), ref)


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_adapter_roundtrip(method, tiny_backbone, images, tmp_path):
    model = _randomize(build_model(method, tiny_backbone, 3, m=2))
    save_adapter(model, tmp_path / "a", task="t")
    loaded = load_adapter(tmp_path / "a", tiny_backbone)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_trains_with_cached_trunk(tiny_backbone):
    from petl_platform.training.loop import TrainConfig, train

    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 2, (24,))
    model = build_model("dtl_plus", tiny_backbone, 2, m=2)
    before = model.vit.blocks[0].dtl_csn.c.detach().clone()
    res = train(model, {"train": (x, y), "test": (x, y)}, TrainConfig(epochs=1, batch_size=8, progress=False))
    assert res.trainable_params == model.num_trainable()
    assert not torch.equal(model.vit.blocks[0].dtl_csn.c, before)

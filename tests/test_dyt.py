"""DyT (dynamic tuning, token dispatch): straight-through training, real sparse inference,
variants, MoE-adapter and checkpoints, on the tiny test ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from petl_platform import PetlError, build_model, load_adapter, save_adapter
from petl_platform.methods.dyt import DyTAdapter, DyTBlock

VARIANTS = ["mlp", "attn", "attn_mlp", "layer"]
NUM_CLASSES = 5


def make(backbone, seed: int = 0, **hp):
    torch.manual_seed(seed)
    model = build_model("dyt", backbone, NUM_CLASSES, **hp)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero adapters and dispatchers that split tokens roughly in half
        for blk in model.vit.blocks:
            for a in blk.adapter:
                a.up.normal_(0, 0.1, generator=gen)
            for d in blk.dispatcher:
                d.proj.weight.normal_(0, 0.5, generator=gen)
    return model


def set_bias(model, value: float) -> None:
    with torch.no_grad():
        for blk in model.vit.blocks:
            for d in blk.dispatcher:
                d.proj.bias.fill_(value)


def test_config_errors(tiny_backbone):
    with pytest.raises(PetlError, match="dispatch must be one of"):
        build_model("dyt", tiny_backbone, 3, dispatch="token")
    with pytest.raises(PetlError, match="target_rate"):
        build_model("dyt", tiny_backbone, 3, target_rate=1.5)
    model = make(tiny_backbone)
    with pytest.raises(PetlError, match="inference override"):
        model.train()(torch.randn(1, 3, 32, 32), ratio=0.5)
    with pytest.raises(PetlError, match="no DyT inference"):
        model.last_stats()


def test_straight_through_gradients_reach_dispatchers(tiny_backbone, images):
    model = make(tiny_backbone, distill=False).train()
    y = torch.arange(4) % NUM_CLASSES
    out = model.training_step(images, y, 0.0)
    out.loss.backward()
    for blk in model.vit.blocks:
        g = blk.dispatcher[0].proj.weight.grad
        assert g is not None and g.abs().sum() > 0
    # the rate loss alone reaches the dispatchers too (through the soft mask only)
    model.zero_grad()
    run = model.new_run("train")
    model.forward_blocks(model.embed(images), run)
    run.rate_tensor().backward()
    assert all(blk.dispatcher[0].proj.weight.grad.abs().sum() > 0 for blk in model.vit.blocks)
    assert 0.0 < out.metrics["activation_rate"] < 1.0


def test_train_forward_uses_the_hard_mask(tiny_backbone, images):
    model = make(tiny_backbone).train()
    torch.manual_seed(3)
    run = model.new_run("train")
    x = model.embed(images)
    out = model.forward_blocks(x, run)
    assert len(run.masks) == len(model.vit.blocks)
    for m in run.masks:
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}  # forward value is the hard mask
        assert m.requires_grad  # ... while the graph carries the soft one
    with torch.no_grad():  # recompute X_out = X' + M * MLP(LN(X')) + Adapter(X') with 0/1 masks
        ref = x
        for blk, m in zip(model.vit.blocks, run.masks):
            h = ref + blk.ls1(blk.attn(blk.norm1(ref)))
            ref = h + blk.adapter[0](h) + m.detach().unsqueeze(-1) * blk.ls2(blk.mlp(blk.norm2(h)))
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-5)
    assert 0 < torch.stack(run.masks).detach().mean() < 1


@pytest.mark.parametrize("mode", ["train", "sparse", "ratio"])
def test_class_token_never_skipped(tiny_backbone, images, mode):
    model = make(tiny_backbone)
    set_bias(model, -1e4)  # every patch token off
    run = model.new_run(mode="sparse" if mode == "ratio" else mode, ratio=0.0 if mode == "ratio" else None)
    with torch.no_grad():
        model.forward_blocks(model.embed(images), run)
    for m in run.masks:
        assert torch.all(m[:, 0] == 1)
        assert torch.all(m[:, 1:] == 0)
    if mode != "train":
        with torch.no_grad():
            model.eval()(images)
        assert model.last_stats()["activation_rate"] == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ratio", [None, 0.3])
def test_sparse_equals_masked_dense(tiny_backbone, images, variant, ratio):
    model = make(tiny_backbone, dispatch=variant, experts=2).eval()
    with torch.no_grad():
        masked = model(images, ratio=ratio, mode="masked")
        masked_stats = model.last_stats()
        sparse = model(images, ratio=ratio)
        stats = model.last_stats()
    torch.testing.assert_close(sparse, masked, rtol=0, atol=1e-5)
    assert stats["mode"] == "sparse"
    assert stats["activation_rate_per_layer"] == masked_stats["activation_rate_per_layer"]
    assert 0.0 < stats["activation_rate"] < 1.0
    assert stats["flops"] < masked_stats["flops"]  # skipped work is really skipped
    if ratio is not None:  # top-ratio: exactly round(0.3 * 64) = 19 of 64 patch tokens per layer
        assert stats["activation_rate_per_layer"] == [19 / 64] * len(model.vit.blocks)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_active_equals_dense_adapter_model(tiny_backbone, images, variant):
    model = make(tiny_backbone, dispatch=variant).eval()
    set_bias(model, 1e4)
    x = model.embed(images)
    with torch.no_grad():
        out = model(images)
        stats = model.last_stats()
        complete = model(images, mode="complete")
        dense_stats = model.last_stats()
        ref = x  # the dense adapter model, written with the untouched timm blocks
        for blk, dyt in zip(tiny_backbone.blocks, model.vit.blocks):
            if variant == "mlp":
                h = ref + blk.ls1(blk.attn(blk.norm1(ref)))
                ref = blk(ref) + dyt.adapter[0](h)
            elif variant == "attn":
                h = ref + blk.ls1(blk.attn(blk.norm1(ref))) + dyt.adapter[0](ref)
                ref = h + blk.ls2(blk.mlp(blk.norm2(h)))
            elif variant == "attn_mlp":
                h = ref + blk.ls1(blk.attn(blk.norm1(ref))) + dyt.adapter[0](ref)
                ref = h + blk.ls2(blk.mlp(blk.norm2(h))) + dyt.adapter[1](h)
            else:
                ref = blk(ref) + dyt.adapter[0](ref)
        ref = model.forward_head(model.vit.norm(ref))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(complete, ref, rtol=0, atol=1e-5)
    assert stats["activation_rate"] == 1.0
    n_disp = 2 if variant == "attn_mlp" else 1
    dispatcher_macs = n_disp * len(model.vit.blocks) * 4 * 65 * 64  # B * N * C per dispatcher
    assert stats["flops"] == dense_stats["flops"] + dispatcher_macs
    assert dense_stats["flops"] == dense_stats["dense_flops"] == stats["dense_flops"]


def test_flops_count_only_active_mlp_tokens(tiny_backbone, images):
    model = make(tiny_backbone).eval()
    with torch.no_grad():
        model(images)
    s = model.last_stats()
    b, n, c, hidden, depth = 4, 65, 64, 256, len(model.vit.blocks)
    active = sum(4 * (1 + 64 * r) for r in s["activation_rate_per_layer"])  # cls + active patches
    skipped_macs = (depth * b * n - active) * 2 * c * hidden
    assert s["flops"] == pytest.approx(s["dense_flops"] - skipped_macs + depth * b * n * c, abs=1)


def test_activation_rate_stat_matches_mask(tiny_backbone, images):
    model = make(tiny_backbone).eval()
    logits = []
    hooks = [blk.dispatcher[0].register_forward_hook(lambda m, i, o: logits.append(o)) for blk in model.vit.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    rates = [float((torch.sigmoid(lg[:, 1:]) >= 0.5).float().mean()) for lg in logits]
    stats = model.last_stats()
    assert stats["activation_rate_per_layer"] == pytest.approx(rates, abs=1e-7)
    assert stats["activation_rate"] == pytest.approx(sum(rates) / len(rates), abs=1e-7)
    assert len(set(rates)) > 1 and 0 < min(rates) and max(rates) < 1


def test_moe_parameter_count(tiny_backbone):
    c, d, depth = 64, 8, len(tiny_backbone.blocks)
    plain = build_model("dyt", tiny_backbone, NUM_CLASSES)
    assert plain.num_trainable() == depth * (2 * c * d + c + 1)  # adapter (no biases, eq. 1) + TD
    moe = build_model("dyt", tiny_backbone, NUM_CLASSES, experts=4)
    assert moe.num_trainable() == depth * (4 * 2 * c * d + c * 4 + 4 + c + 1)  # + router C x N
    both = build_model("dyt", tiny_backbone, NUM_CLASSES, experts=4, dispatch="attn_mlp")
    assert both.num_trainable() == 2 * moe.num_trainable()


def test_moe_mixes_weights_per_image():
    torch.manual_seed(0)
    adapter = DyTAdapter(16, 4, experts=3)
    with torch.no_grad():
        adapter.up.normal_()
        adapter.router.weight.normal_()
    x = torch.randn(2, 7, 16)
    x[1] += 3.0  # a different mean-pooled token -> a different router output
    alpha = torch.softmax(adapter.router(x.mean(1)), -1)
    assert not torch.allclose(alpha[0], alpha[1], atol=1e-3)
    down, up = adapter.mixed_weights(x)
    assert down.shape == (2, 16, 4) and up.shape == (2, 4, 16)
    for b in range(2):  # eq. 7: W^moe = sum_i alpha_i W^i, one mix per image
        torch.testing.assert_close(down[b], sum(alpha[b, e] * adapter.down[e] for e in range(3)))
        torch.testing.assert_close(up[b], sum(alpha[b, e] * adapter.up[e] for e in range(3)))
    assert not torch.allclose(down[0], down[1], atol=1e-3)
    out = adapter(x)
    for b in range(2):
        torch.testing.assert_close(out[b], F.relu(x[b] @ down[b]) @ up[b])
        torch.testing.assert_close(out[b:b + 1], adapter(x[b:b + 1]))  # independent of the batch


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_forward_backward(tiny_backbone, images, variant):
    model = make(tiny_backbone, dispatch=variant, experts=2).train()
    assert all(isinstance(b, DyTBlock) and b.dispatch == variant for b in model.vit.blocks)
    out = model.training_step(images, torch.arange(4) % NUM_CLASSES, 0.5)
    assert out.logits.shape == (4, NUM_CLASSES) and torch.isfinite(out.loss)
    assert {"loss_cls", "loss_rate", "loss_complete", "loss_distill", "activation_rate"} <= set(out.metrics)
    out.loss.backward()
    for blk in model.vit.blocks:
        for a in blk.adapter:
            assert a.up.grad.abs().sum() > 0 and a.router.weight.grad.abs().sum() > 0
        for d in blk.dispatcher:
            assert d.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert model.train()(images).shape == (4, NUM_CLASSES)  # training-mode call: dynamic logits


def test_branch_dropout_acts_on_adapter_output(tiny_backbone):
    adapter = make(tiny_backbone).vit.blocks[0].adapter[0].train()
    adapter.branch_dropout.p = 1.0
    assert torch.count_nonzero(adapter(torch.randn(2, 5, 64))) == 0


def test_save_load_round_trip_keeps_dispatcher_and_moe(tiny_backbone, images, tmp_path):
    model = make(tiny_backbone, dispatch="attn_mlp", experts=3, bottleneck=4).eval()
    save_adapter(model, tmp_path, task="t")
    loaded = load_adapter(tmp_path, tiny_backbone)
    assert loaded.config == model.config
    state = loaded.trainable_state_dict()
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(state[k], v), k
    assert any("dispatcher" in k for k in state) and any("router" in k for k in state)
    with torch.no_grad():
        for ratio in (None, 0.4):
            assert torch.equal(loaded(images, ratio=ratio), model(images, ratio=ratio))
            assert loaded.last_stats() == model.last_stats()


def test_cross_task_dispatch_equals_each_task_alone(tiny_backbone, images):
    """Three DyT tasks (different dispatchers, adapters, ratios) in one pass: every layer's frozen MLP
    runs once on the active tokens of all tasks, and each task's answer equals its own infer."""
    from petl_platform.methods.dyt.mixed import infer_mixed

    models = [make(tiny_backbone, seed=s).eval() for s in (0, 1, 2)]
    xs = [images, images[:2], torch.flip(images, dims=[0])]
    ratios = [None, 0.25, 0.75]
    calls = []
    hook = models[0].vit.blocks[0].mlp.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        mixed = infer_mixed(models, xs, ratios)
    finally:
        hook.remove()
    assert len(calls) == 1  # block 0's frozen MLP: one call for the three tasks
    for m, x, r, (logits, stats) in zip(models, xs, ratios, mixed):
        alone, info = m.infer(x, ratio=r)
        assert torch.allclose(logits, alone, atol=1e-5)
        assert stats["flops"] == info["flops"] and stats["activation_rate"] == info["activation_rate"]
    patches = 64  # 32 px / patch 4: 8 x 8, plus one class token per image
    active = sum(len(x) * (1 + patches * st["activation_rate_per_layer"][0]) for x, (_, st) in zip(xs, mixed))
    assert calls[0] == round(active) < sum(len(x) for x in xs) * (patches + 1)  # only active tokens ran

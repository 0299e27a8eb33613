"""Dyn-Adapter early exits (methods/dyn_exit): registration, config, exits, sparsification,
dynamic inference with batch shrinking, calibration, artifacts and merging."""

import math

import pytest
import torch
import torch.nn.functional as F

from petl_platform.errors import PetlError
from petl_platform.methods import adapter_modules, build_model, get_method, list_methods
from petl_platform.methods.dyn_exit import (DYN_FIELD_NAMES, EXCLUDED, accuracy_flops_curve, calibrate, eligible,
                                            register_dyn_variants, save_curve_png, stage_weights)
from petl_platform.methods.dyn_exit.calibrate import evaluate_dynamic
from petl_platform.tracking.artifacts import load_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster single-threaded

TOKEN_SEQUENTIAL = ["linear", "lora", "adapter", "repadapter", "arc", "arc_att"]


def _present(names):
    return [n for n in names if n in list_methods()]


def _between(values: torch.Tensor, q: float) -> float:
    """A threshold strictly between two observed values (no ties with any sample)."""
    v = values.sort().values
    k = min(len(v) - 2, int(q * len(v)))
    return float((v[k] + v[k + 1]) / 2)


# ----------------------------------------------------------------- registration and config
def test_dyn_variants_registered_for_token_sequential_bases():
    for base in _present(TOKEN_SEQUENTIAL):
        assert eligible(base) == (True, "")
        spec = get_method("dyn_" + base)
        assert spec.mergeable == get_method(base).mergeable and not spec.shares_trunk
        assert set(spec.config_cls.field_names()) == set(get_method(base).config_cls.field_names()) | set(DYN_FIELD_NAMES)
    for base in EXCLUDED:
        assert "dyn_" + base not in list_methods()
    assert not any(n.startswith("dyn_dyn_") for n in list_methods())
    assert register_dyn_variants() == []  # idempotent: a second call registers nothing


def test_config_composition_and_errors(tiny_backbone, tiny_backbone8):
    m = build_model("dyn_linear", tiny_backbone8, 10, p_m=0.2, stages=2)
    assert (m.config.p_m, m.config.stages, m.interval) == (0.2, 2, 4)
    if "lora" in list_methods():
        m = build_model("dyn_lora", tiny_backbone8, 10, rank=4, p_m=0.2)
        assert (m.config.rank, m.config.p_m, m.config.stages) == (4, 0.2, 4)
        with pytest.raises(PetlError, match="rank"):
            build_model("dyn_lora", tiny_backbone8, 10, rank=0)  # the base's own checks still run
    with pytest.raises(PetlError, match=r"no hyperparameter 'bogus'; valid: .*p_m"):
        build_model("dyn_linear", tiny_backbone8, 10, bogus=1)
    with pytest.raises(PetlError, match="does not divide the backbone depth 8"):
        build_model("dyn_linear", tiny_backbone8, 10, stages=3)
    with pytest.raises(PetlError, match="does not divide the backbone depth 4"):
        build_model("dyn_linear", tiny_backbone, 10, stages=3)


def test_stage_errors_and_valid_small_depth(tiny_backbone):
    m = build_model("dyn_linear", tiny_backbone, 10, stages=4)
    assert m.interval == 1 and len(m.exits) == 3
    for bad in ({"p_m": 1.0}, {"lambda_curve": "step"}, {"stages": 1}, {"head_policy": "huge"},
                {"lambda_shallow_start": 0.7}):
        with pytest.raises(PetlError):
            build_model("dyn_linear", tiny_backbone, 10, **bad)


def test_exit_heads_balanced(tiny_backbone8):
    m = build_model("dyn_linear", tiny_backbone8, 7)
    kinds = [type(h).__name__ for h in m.exits]
    assert kinds == ["Sequential", "Sequential", "Linear"]  # MLP at shallow exits 1-2, linear at exit 3
    assert m.exits[0][0].out_features == m.config.head_hidden
    assert m.exit_thresholds.shape == (3,) and bool((m.exit_thresholds > 1).all())
    assert [type(h).__name__ for h in build_model("dyn_linear", tiny_backbone8, 7, head_policy="linear").exits] == ["Linear"] * 3


# ----------------------------------------------------------------- training behaviour
def test_lambda_schedule_endpoints():
    cfg = get_method("dyn_linear").config_cls()
    for curve in ("cosine", "linear"):
        c = get_method("dyn_linear").config_cls(lambda_curve=curve)
        assert stage_weights(c, 0.0) == pytest.approx([0.1, 0.1, 1.0, 1.0])
        assert stage_weights(c, 1.0) == pytest.approx([0.5, 0.5, 0.5, 0.5])
        grid = [stage_weights(c, t / 50) for t in range(51)]
        shallow, deep = [g[0] for g in grid], [g[3] for g in grid]
        assert all(a <= b + 1e-12 for a, b in zip(shallow, shallow[1:]))  # shallow grows
        assert all(a >= b - 1e-12 for a, b in zip(deep, deep[1:]))  # deep declines
        assert max(shallow) == pytest.approx(0.5) and min(deep) == pytest.approx(0.5)
    assert stage_weights(get_method("dyn_linear").config_cls(lambda_curve="linear"), 0.5)[0] == pytest.approx(0.3)
    assert stage_weights(cfg, 0.5)[0] == pytest.approx(0.3)  # cosine midpoint is the same by symmetry
    assert stage_weights(cfg, 0.25)[0] == pytest.approx(0.1 + 0.4 * (1 - math.cos(math.pi / 4)) / 2)


def test_dropout_rates_per_block(tiny_backbone8):
    base = next(iter(_present(["lora", "adapter", "repadapter"])), None)
    if base is None:
        pytest.skip("no adapter-based method registered yet")
    m = build_model("dyn_" + base, tiny_backbone8, 5, p_shallow=0.3, p_deep=0.05)
    for b in range(8):
        mods = adapter_modules(m.vit, b)
        assert mods, f"block {b} has no AdapterModule"
        assert {mod.branch_dropout.p for mod in mods} == ({0.3} if b < 4 else {0.05})


def test_dropout_rates_leave_a_probe_unchanged_so_its_space_omits_them(tiny_backbone8, images):
    """p_shallow / p_deep drop adapter branches; a probe has none, so its training step is the same
    at any rate (P7 saw dyn_linear's every epoch unchanged) and its default space searches p_m
    alone. Over an adapter base, the rates change the step."""
    from petl_platform.training.space import default_space

    y = torch.tensor([0, 1, 2, 3])

    def loss(method, **rates):
        torch.manual_seed(0)
        m = build_model(method, tiny_backbone8, 5, **rates).train()
        with torch.no_grad():  # trained-looking adapters: LoRA's B starts at zero, dropping nothing
            for t in m.parameters():
                if t.requires_grad:
                    t.add_(0.1 * torch.randn_like(t))
        torch.manual_seed(1)
        return m.training_step(images, y, progress=0.5).loss.item()

    assert loss("dyn_linear", p_shallow=0.1, p_deep=0.0) == loss("dyn_linear", p_shallow=0.7, p_deep=0.3)
    assert set(default_space("dyn_linear", depth=8)) == {"lr", "p_m"}
    base = next(iter(_present(["lora", "adapter"])), None)
    if base is not None:
        assert loss("dyn_" + base, p_shallow=0.1, p_deep=0.0) != loss("dyn_" + base, p_shallow=0.7, p_deep=0.3)
        assert {"p_shallow", "p_deep", "p_m"} <= set(default_space("dyn_" + base, depth=8))


def test_training_step_weighted_loss(tiny_backbone8, images):
    m = build_model("dyn_linear", tiny_backbone8, 5).eval()  # eval: deterministic comparison
    y = torch.tensor([0, 1, 2, 3])
    out = m.training_step(images, y, progress=0.0)
    logits = m.all_exit_logits(images)
    expected = sum(w * F.cross_entropy(z, y) for w, z in zip([0.1, 0.1, 1.0, 1.0], logits))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, m(images))
    assert set(out.metrics) >= {f"exit{i}_{k}" for i in range(1, 5) for k in ("loss", "acc")}
    m.train()
    assert m(images).shape == (4, 5)  # training-mode forward: final exit logits


def test_gradient_mask_share_and_frozen_untouched(tiny_backbone, images):
    base = "lora" if "lora" in list_methods() else "linear"
    m = build_model(f"dyn_{base}", tiny_backbone, 5, p_m=0.3, stages=2)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    out = m.training_step(images, torch.tensor([0, 1, 2, 3]), 0.5)
    out.loss.backward()
    trainable = [p for p in m.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.ones_like(p)
    m.after_backward()
    n = sum(p.numel() for p in trainable)
    zeros = sum((p.grad == 0).sum().item() for p in trainable)
    assert abs(zeros - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7), (zeros, n)
    assert all(((p.grad == 0) | (p.grad == 1)).all() for p in trainable)
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, frozen[name])
    # mask_heads=False leaves the heads' gradients whole
    m2 = build_model(f"dyn_{base}", tiny_backbone, 5, p_m=0.5, stages=2, mask_heads=False)
    for p in m2.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    m2.after_backward()
    assert all(bool((p.grad == 1).all()) for n, p in m2.named_parameters() if n.startswith(("head.", "exits.")))


# ----------------------------------------------------------------- dynamic inference
@pytest.fixture(scope="module")
def dyn8(tiny_backbone8):
    torch.manual_seed(3)
    m = build_model("dyn_linear", tiny_backbone8, 6).eval()
    with torch.no_grad():  # spread the heads' confidences so thresholds split the batch
        for p in list(m.exits.parameters()) + list(m.head.parameters()):
            p.mul_(4)
    return m


def test_zero_thresholds_exit_at_stage_one(dyn8):
    x = torch.randn(10, 3, 32, 32)
    out = dyn8.predict_dynamic(x, thresholds=[0.0, 0.0, 0.0])
    assert out["exit_stage"].tolist() == [1] * 10
    torch.testing.assert_close(out["logits"], dyn8.all_exit_logits(x)[0])
    prof = dyn8.flop_profile()
    assert out["flops"] == 10 * (prof["embed"] + prof["stage"][0] + prof["head"][0])
    assert out["flops"] < 0.3 * out["full_flops"]


def test_thresholds_above_one_equal_full_depth(dyn8):
    x = torch.randn(10, 3, 32, 32)
    out = dyn8.predict_dynamic(x, thresholds=[1.01, 1.01, 1.01])
    assert out["exit_stage"].tolist() == [4] * 10
    torch.testing.assert_close(out["logits"], dyn8(x))
    default = dyn8.predict_dynamic(x)  # uncalibrated buffer: never exit early
    torch.testing.assert_close(default["logits"], dyn8(x))
    assert out["flops"] > out["full_flops"]  # the early heads ran too


def test_batch_shrinking_keeps_input_order(dyn8):
    torch.manual_seed(5)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        conf = [z.softmax(-1).amax(-1) for z in dyn8.all_exit_logits(x)]
    thr = [_between(conf[0], 0.7), _between(conf[1], 0.6), _between(conf[2], 0.5)]
    out = dyn8.predict_dynamic(x, thresholds=thr)
    stages = out["exit_stage"]
    assert len(set(stages.tolist())) >= 3, stages  # a real mix of exits
    singles = [dyn8.predict_dynamic(x[i:i + 1], thresholds=thr) for i in range(len(x))]
    assert stages.tolist() == [s["exit_stage"].item() for s in singles]
    torch.testing.assert_close(out["logits"], torch.cat([s["logits"] for s in singles]), atol=1e-4, rtol=1e-4)
    assert out["flops"] == sum(s["flops"] for s in singles) < out["full_flops"]
    with pytest.raises(PetlError, match="expected 3 thresholds"):
        dyn8.predict_dynamic(x, thresholds=[0.5])


def test_average_pool_backbone_exits():
    """Exits pool like the backbone: with ``global_pool="avg"`` (norm = Identity, fc_norm = LN)."""
    from petl_platform import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2,
                         global_pool="avg")
    m = build_model("dyn_linear", bb, 3, stages=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = m.run_stage(m.embed(x), 0)
        expected = m.exits[0](bb.fc_norm(bb.norm(h)[:, bb.num_prefix_tokens:].mean(1)))
    torch.testing.assert_close(m.predict_dynamic(x, [0.0])["logits"], expected)
    torch.testing.assert_close(m.predict_dynamic(x, [1.5])["logits"], m(x))


# ----------------------------------------------------------------- calibration, artifacts, merge
def _blobs(n, gen, templates):
    y = torch.randint(0, len(templates), (n,), generator=gen)
    noise = torch.rand(n, 1, 1, 1, generator=gen) * 3  # per-sample difficulty
    return templates[y] + noise * torch.randn(n, 3, 32, 32, generator=gen), y


@pytest.fixture(scope="module")
def trained(tiny_backbone):
    from petl_platform.training import train
    from petl_platform.training.loop import TrainConfig

    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(4, 3, 32, 32, generator=gen)
    data = {s: _blobs(n, gen, templates) for s, n in (("train", 256), ("val", 192), ("test", 256))}
    torch.manual_seed(0)
    m = build_model("dyn_linear", tiny_backbone, 4, stages=4)
    train(m, data, TrainConfig(epochs=4, batch_size=32, lr=1e-2, warmup_epochs=0, progress=False, device="cpu"))
    return m.eval(), data


def test_calibration_meets_budget_on_held_out(trained, tmp_path):
    m, data = trained
    res = calibrate(m, *data["val"], budget=0.5)
    assert res["feasible"] and res["flops_fraction"] <= 0.5
    assert m.exit_thresholds.tolist() == pytest.approx(res["thresholds"])
    val = evaluate_dynamic(m, *data["val"])  # measured on shrinking batches = simulated
    assert val["flops_fraction"] == pytest.approx(res["flops_fraction"], abs=0.02)
    assert val["accuracy"] == pytest.approx(res["val_accuracy"], abs=0.02)
    test = evaluate_dynamic(m, *data["test"])
    assert test["flops_fraction"] <= 0.5 + 0.06
    assert test["accuracy"] > 0.5  # 4 classes: well above chance
    curve = accuracy_flops_curve(m, *data["val"], [0.4, 0.7], *data["test"])
    assert [p["budget"] for p in curve["points"]] == [0.4, 0.7]
    assert all(p["flops_fraction"] <= p["budget"] + 0.06 for p in curve["points"])
    assert m.exit_thresholds.tolist() == pytest.approx(res["thresholds"])  # the curve leaves them alone
    png = save_curve_png(curve, tmp_path / "curve.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_per_epoch_exit_statistics_simulated_equal_the_measured(dyn8):
    """A trial's per-epoch exit statistics come from the one pass of every exit (``simulated_point``,
    ``inference_metrics(final=False)``); its last epoch measures them with dynamic inference. The
    two agree: same thresholds, and the same accuracy, FLOPs and exit mix up to batch numerics.
    Labels are the final exit's predictions, so a 50 % budget needs a mix of exits (as below)."""
    from petl_platform.methods.dyn_exit.calibrate import exit_probabilities, simulated_point
    from petl_platform.training.measure import inference_metrics

    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y = dyn8(x).argmax(-1)
    probs = exit_probabilities(dyn8, x)
    [measured] = accuracy_flops_curve(dyn8, x, y, [0.5], probs=probs)["points"]
    sim = simulated_point(dyn8, probs, y, 0.5)
    assert sim["thresholds"] == measured["thresholds"] and sim["feasible"] == measured["feasible"]
    assert sum(f > 0.05 for f in sim["exit_fractions"]) >= 2 and sum(sim["exit_fractions"]) == pytest.approx(1.0)
    assert sim["accuracy"] == pytest.approx(measured["accuracy"], abs=0.01)
    assert sim["flops_fraction"] == pytest.approx(measured["flops_fraction"], abs=0.01)
    assert sim["exit_fractions"] == pytest.approx(measured["exit_fractions"], abs=0.01)
    per_epoch = inference_metrics(dyn8, x, y, max_images=len(x), exit_probs=probs, final=False)
    last = inference_metrics(dyn8, x, y, max_images=len(x), exit_probs=probs, final=True)
    assert set(last) - set(per_epoch) == {"img_per_s"}
    for k in per_epoch:
        assert per_epoch[k] == pytest.approx(last[k], abs=0.01), k
    assert dyn8.exit_thresholds.min() > 1  # neither left thresholds behind (dyn8 is shared)
    # a val split larger than max_images: the caller's pass over all of it is cut to the same images
    for final in (False, True):
        cut = inference_metrics(dyn8, x, y, max_images=100, exit_probs=probs, final=final)
        alone = inference_metrics(dyn8, x[:100], y[:100], max_images=100, final=final)
        assert {k: v for k, v in cut.items() if k != "img_per_s"} == \
            pytest.approx({k: v for k, v in alone.items() if k != "img_per_s"}, abs=1e-6)


def test_calibration_trades_exits_for_budget(dyn8):
    """Labels = the final exit's predictions: full depth is always right, early exits only
    sometimes, so meeting 50 % FLOPs needs a real mix of exits; the budget must hold on new data."""
    gen = torch.Generator().manual_seed(7)
    x_val, x_test = torch.randn(400, 3, 32, 32, generator=gen), torch.randn(400, 3, 32, 32, generator=gen)
    with torch.no_grad():
        y_val, y_test = dyn8(x_val).argmax(-1), dyn8(x_test).argmax(-1)
    res = calibrate(dyn8, x_val, y_val, budget=0.5)
    try:
        assert res["feasible"] and res["flops_fraction"] <= 0.5 and res["full_val_accuracy"] == 1.0
        test = evaluate_dynamic(dyn8, x_test, y_test)
        assert test["flops_fraction"] <= 0.5 + 0.08  # ~3 sd of the held-out exit mix at n = 400
        assert abs(test["accuracy"] - res["val_accuracy"]) <= 0.15
        assert sum(f > 0.05 for f in test["exit_fractions"]) >= 2  # a mix, not one exit for all
        assert res["val_accuracy"] >= max(p["val_accuracy"] for p in _shared_grid(dyn8, x_val, y_val, 0.5))
    finally:
        dyn8.exit_thresholds.fill_(2.0)


def _shared_grid(model, x, y, budget):
    from petl_platform.methods.dyn_exit.calibrate import _simulate, exit_costs, exit_probabilities

    probs = exit_probabilities(model, x)
    conf, correct = probs[:-1].amax(-1).numpy(), (probs.argmax(-1) == y[None]).numpy()
    cost = exit_costs(model)
    pts = []
    for t in torch.linspace(0, 1, 41).tolist():
        acc, flops, _ = _simulate(conf, correct, cost, torch.full((len(conf),), t).numpy())
        if flops <= budget:
            pts.append({"val_accuracy": acc, "flops": flops})
    return pts


def test_save_load_keeps_thresholds(tiny_backbone8, tmp_path, images):
    base = "lora" if "lora" in list_methods() else "linear"
    m = build_model(f"dyn_{base}", tiny_backbone8, 3, p_m=0.2).eval()
    m.exit_thresholds.copy_(torch.tensor([0.4, 0.6, 0.8]))
    save_adapter(m, tmp_path, task="t", classes=["a", "b", "c"])
    loaded = load_adapter(tmp_path, tiny_backbone8)
    assert loaded.method == m.method and loaded.config == m.config
    assert loaded.exit_thresholds.tolist() == pytest.approx([0.4, 0.6, 0.8])
    a, b = m.predict_dynamic(images), loaded.predict_dynamic(images)
    torch.testing.assert_close(a["logits"], b["logits"])
    assert torch.equal(a["exit_stage"], b["exit_stage"])


def test_merged_keeps_exits(tiny_backbone8, images):
    if "lora" not in list_methods():
        pytest.skip("lora not registered yet")
    torch.manual_seed(1)
    m = build_model("dyn_lora", tiny_backbone8, 3).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    m.exit_thresholds.copy_(torch.tensor([0.5, 0.5, 0.5]))
    mm = m.merged()
    assert not any(p.requires_grad for n, p in mm.vit.named_parameters())
    torch.testing.assert_close(mm(images), m(images), atol=1e-4, rtol=1e-4)
    for thr in ([0.0] * 3, None):
        a, b = m.predict_dynamic(images, thr), mm.predict_dynamic(images, thr)
        torch.testing.assert_close(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)
    if "adapter" in list_methods():
        with pytest.raises(PetlError, match="not mergeable"):
            build_model("dyn_adapter", tiny_backbone8, 3).merged()

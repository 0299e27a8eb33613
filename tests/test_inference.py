"""Multi-task predictor (over the mixed-task engine): equals each task alone, trunk computed once,
clear refusals. The engine's own row-level tests are in test_engine.py."""

from collections import Counter

import pytest
import torch

from petl_platform import PetlError, build_model, list_methods
from petl_platform.inference import MultiTaskPredictor

SHARING = {"linear": ("linear", {}), "dtl_m3": ("dtl", {"m": 3}), "dtl_m6": ("dtl", {"m": 6}),
           "plus_m2": ("dtl_plus", {"m": 2}), "plus_m5": ("dtl_plus", {"m": 5})}
OTHER = "adapter"  # a second per-row adapter method beside "full" (LoRA): both touch every block


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_backbone8):
    out = {name: _randomize(build_model(meth, tiny_backbone8, 3 + i, **hp), i) for i, (name, (meth, hp)) in enumerate(SHARING.items())}
    out["full"] = _randomize(build_model("lora", tiny_backbone8, 4, rank=2), 9)
    out[OTHER] = _randomize(build_model(OTHER, tiny_backbone8, 2), 10)
    return out


def _count_calls(blocks, counter, tag):
    return [blk.register_forward_hook(lambda *_, i=i: counter.update([(tag, i)])) for i, blk in enumerate(blocks)]


def test_equals_each_task_alone(tiny_backbone8, models, images):
    pred = MultiTaskPredictor(tiny_backbone8, models)
    out = pred.predict(images, list(models))
    assert set(out) == set(models)
    for name, model in models.items():
        with torch.no_grad():
            alone = model(images)
        assert out[name].shape == alone.shape
        torch.testing.assert_close(out[name], alone, rtol=0, atol=1e-5, msg=f"task {name}")
    # outputs really differ per task (the comparison above is not trivially between equal heads)
    assert not torch.allclose(out["dtl_m3"], out["dtl_m6"][:, :4], atol=1e-3)


def test_trunk_runs_once_and_stats(tiny_backbone8, models, images):
    pred = MultiTaskPredictor(tiny_backbone8, models)
    pred.predict(images, list(models))  # builds the engine's mixed ViT before the hooks go on
    pred.totals = {"calls": 0, "blocks_run": 0, "blocks_independent": 0}
    calls = Counter()
    hooks = _count_calls(tiny_backbone8.blocks, calls, "trunk")
    hooks += _count_calls(pred.engine._mixed.blocks, calls, "rows")
    for name, model in models.items():
        hooks += _count_calls(model.vit.blocks, calls, name)
    pred.predict(images, list(models))
    for h in hooks:
        h.remove()
    depth, kmax = 8, 8  # the linear probe shares the whole trunk
    assert [calls[("trunk", i)] for i in range(depth)] == [1] * kmax
    # both per-row adapter tasks (LoRA, Adapter) go through the mixed ViT together: once per block
    assert [calls[("rows", i)] for i in range(depth)] == [1] * depth
    for name, model in models.items():
        k = model.shared_prefix_blocks
        own = [0] * depth if k == 0 else [0] * k + [1] * (depth - k)
        assert [calls[(name, i)] for i in range(depth)] == own, name
    st = pred.last_stats
    expect_tails = {n: depth - m.shared_prefix_blocks for n, m in models.items()}
    assert st.trunk_blocks == kmax and st.tail_blocks == expect_tails
    assert st.blocks_run == kmax + sum(expect_tails.values())
    assert st.blocks_independent == depth * len(models)
    assert st.block_ratio == pytest.approx(st.blocks_independent / st.blocks_run) and st.blocks_saved > 0
    assert (st.embeds_run, st.embeds_independent) == (1, len(models))  # the frozen embedding once
    assert pred.totals == {"calls": 1, "blocks_run": st.blocks_run, "blocks_independent": st.blocks_independent}


def test_trunk_only_as_deep_as_requested_tasks(tiny_backbone8, models, images):
    pred = MultiTaskPredictor(tiny_backbone8, models)
    calls = Counter()
    hooks = _count_calls(tiny_backbone8.blocks, calls, "trunk")
    out = pred.predict(images, ["plus_m2", "dtl_m3", "dtl_m3"])
    for h in hooks:
        h.remove()
    assert list(out) == ["plus_m2", "dtl_m3"]
    assert sum(calls.values()) == 3 and pred.last_stats.trunk_blocks == 3
    assert pred.last_stats.blocks_run == 3 + 6 + 5
    out = pred.predict(images, ["full"])  # no sharing task: no trunk pass at all
    assert pred.last_stats.trunk_blocks == 0 and pred.last_stats.blocks_run == 8
    torch.testing.assert_close(out["full"], models["full"](images), rtol=0, atol=1e-5)


def test_unknown_task_lists_valid(tiny_backbone8, models, images):
    pred = MultiTaskPredictor(tiny_backbone8, models)
    with pytest.raises(PetlError, match=r"unknown task 'nope'; valid tasks: adapter, dtl_m3, dtl_m6, full"):
        pred.predict(images, ["dtl_m3", "nope"])
    with pytest.raises(PetlError, match="no task requested"):
        pred.predict(images, [])


def test_mismatched_backbone_refused(tiny_backbone, tiny_backbone8, models):
    other = build_model("dtl", tiny_backbone, 2, m=2)
    assert other.backbone_fingerprint != tiny_backbone8.fingerprint
    with pytest.raises(PetlError, match="fingerprint"):
        MultiTaskPredictor(tiny_backbone8, {**models, "alien": other})
    pred = MultiTaskPredictor(tiny_backbone8, models)
    with pytest.raises(PetlError, match="rebuild or reload the adapter on this backbone"):
        pred.add("alien", other)
    assert "alien" not in pred.tasks


def test_add_remove_and_default_all(tiny_backbone8, models, images):
    pred = MultiTaskPredictor(tiny_backbone8)
    for name in ("dtl_m3", "linear"):
        pred.add(name, models[name])
    assert set(pred.predict(images)) == {"dtl_m3", "linear"}
    pred.remove("linear")
    assert pred.tasks == ["dtl_m3"]
    with pytest.raises(PetlError, match="unknown task 'linear'"):
        pred.remove("linear")


@pytest.mark.parametrize("method", list_methods())
def test_every_registered_method_plugs_in(method, tiny_backbone8, images):
    """Any method, through the PetlModel hooks only: predictor output == the model alone."""
    model = _randomize(build_model(method, tiny_backbone8, 3), 11)
    pred = MultiTaskPredictor(tiny_backbone8, {"t": model, "dtl": _randomize(build_model("dtl", tiny_backbone8, 2, m=4), 12)})
    out = pred.predict(images, ["t", "dtl"])
    with torch.no_grad():
        torch.testing.assert_close(out["t"], model(images), rtol=0, atol=1e-5)
    assert pred.last_stats.trunk_blocks == max(4, model.shared_prefix_blocks)


def test_mixed_dynamic_tasks_each_with_own_knobs(tiny_backbone8, models):
    """Dyn-* and DyT tasks in one call with the shared-trunk tasks, each with its own dynamics."""
    torch.manual_seed(0)
    dyn = _randomize(build_model("dyn_lora", tiny_backbone8, 3, rank=2), 11)
    dyt = _randomize(build_model("dyt", tiny_backbone8, 3), 12)
    pred = MultiTaskPredictor(tiny_backbone8, {"lin": models["linear"], "dyn": dyn, "dyt": dyt})
    x = torch.randn(6, 3, 32, 32)
    out, stats = pred.run(x, ["lin", "dyn", "dyt"], knobs={"dyn": {"thresholds": [0.0, 0.0, 0.0]}, "dyt": {"ratio": 0.25}})
    assert stats.extra["dyn"]["exit_stage"] == [1] * 6  # threshold 0: everyone leaves at exit 1
    assert stats.extra["dyn"]["flops"] < stats.extra["dyn"]["full_flops"]
    assert abs(stats.extra["dyt"]["activation_rate"] - 0.25) < 0.05
    with torch.no_grad():
        assert torch.allclose(out["dyn"], dyn.predict_dynamic(x, [0.0, 0.0, 0.0])["logits"], atol=1e-5)
        assert torch.allclose(out["dyt"], dyt(x, ratio=0.25), atol=1e-5)
        assert torch.allclose(out["lin"], models["linear"](x), atol=1e-5)
    # no knobs: the dynamic tasks use their stored settings (thresholds never reached = full depth)
    out, stats = pred.run(x, ["dyn"])
    assert stats.extra["dyn"]["exit_stage"] == [4] * 6
    with pytest.raises(PetlError, match="takes no knobs; got ratio"):
        pred.run(x, ["lin"], knobs={"lin": {"ratio": 0.5}})

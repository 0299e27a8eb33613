"""The budget calibration travels with the adapter: a Dyn-* artifact written by training carries
its val-calibrated ``budget_thresholds`` curve, ``load_adapter`` checks and restores it, and
``thresholds_for_budget`` picks from it, so serving never needs a task's data."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from petl_platform.errors import PetlError
from petl_platform.methods import build_model
from petl_platform.methods.dyn_exit import BUDGETS, budget_curve, thresholds_for_budget
from petl_platform.methods.dyn_exit.calibrate import budget_key, evaluate_dynamic
from petl_platform.tracking.artifacts import CONFIG, load_adapter, save_adapter
from petl_platform.training.measure import budget_calibration

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster single-threaded


@pytest.fixture(scope="module")
def dyn(tiny_backbone8):
    """A dyn_linear model whose heads are confident enough that thresholds split the val set, and
    val labels = its full-depth predictions (full depth always right, early exits sometimes)."""
    torch.manual_seed(3)
    m = build_model("dyn_linear", tiny_backbone8, 6).eval()
    with torch.no_grad():
        for p in list(m.exits.parameters()) + list(m.head.parameters()):
            p.mul_(4)
    x = torch.randn(160, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = m(x).argmax(-1)
    return m, x, y


@pytest.fixture(scope="module")
def calibration(dyn):
    m, x, y = dyn
    return budget_calibration(m, x, y)


def _saved(model, path, extra):
    save_adapter(model, path, task="t", classes=[str(i) for i in range(model.num_classes)], extra=extra)
    return json.loads((path / CONFIG).read_text())


def _edit(path, fn):
    cfg = json.loads((path / CONFIG).read_text())
    fn(cfg)
    (path / CONFIG).write_text(json.dumps(cfg))


# ----------------------------------------------------------------- written, round-tripped
def test_curve_written_for_dyn_method(dyn, calibration, tmp_path):
    m, x, _ = dyn
    cfg = _saved(m, tmp_path, calibration)
    curve, info = cfg["budget_thresholds"], cfg["budget_calibration"]
    assert list(curve) == [budget_key(b) for b in BUDGETS] == ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"]
    assert all(len(t) == m.stages - 1 and all(math.isfinite(v) for v in t) for t in curve.values())
    assert (info["split"], info["samples"]) == ("val", len(x)) and info["full_accuracy"] == 1.0
    assert set(info["per_budget"]) == set(curve)
    for key, point in info["per_budget"].items():
        assert point["feasible"] and point["flops_fraction"] <= float(key) + 1e-9
        assert 0 <= point["accuracy"] <= 1
    assert m.exit_thresholds.tolist() == [2.0] * (m.stages - 1)  # the model's own thresholds untouched


def test_curve_absent_for_static_method(tiny_backbone8, tmp_path):
    m = build_model("linear", tiny_backbone8, 3)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    assert budget_calibration(m, x, y) == {}  # the method spec, not the name, decides
    cfg = _saved(m, tmp_path, budget_calibration(m, x, y))
    assert "budget_thresholds" not in cfg and "budget_calibration" not in cfg
    assert load_adapter(tmp_path, tiny_backbone8).budget_thresholds == {}


def test_load_adapter_round_trips_the_curve(dyn, calibration, tiny_backbone8, tmp_path):
    m, _, _ = dyn
    _saved(m, tmp_path, calibration)
    loaded = load_adapter(tmp_path, tiny_backbone8)
    assert sorted(loaded.budget_thresholds) == list(BUDGETS)
    for b, thr in loaded.budget_thresholds.items():
        assert isinstance(b, float) and thr == pytest.approx(calibration["budget_thresholds"][budget_key(b)], abs=0)
    assert loaded.budget_calibration == calibration["budget_calibration"]


def test_calibrated_points_hold_when_measured(dyn, calibration):
    """The stored accuracy / FLOPs are the search's simulation; predict_dynamic must agree."""
    m, x, y = dyn
    for key, thr in calibration["budget_thresholds"].items():
        measured = evaluate_dynamic(m, x, y, thr)
        point = calibration["budget_calibration"]["per_budget"][key]
        assert measured["flops_fraction"] == pytest.approx(point["flops_fraction"], abs=1e-6)
        assert measured["accuracy"] == pytest.approx(point["accuracy"], abs=1e-6)


def test_probs_are_reused_not_recomputed(dyn, calibration, monkeypatch):
    from petl_platform.methods.dyn_exit import exit_probabilities

    m, x, y = dyn
    probs = exit_probabilities(m, x)
    monkeypatch.setattr(m, "all_exit_logits", lambda x: pytest.fail("val ran twice"))
    assert budget_curve(m, x, y, probs=probs) == calibration


# ----------------------------------------------------------------- thresholds_for_budget
def test_thresholds_picked_are_monotone_in_budget(dyn, calibration, tiny_backbone8, tmp_path):
    m, x, y = dyn
    _saved(m, tmp_path, calibration)
    curve = load_adapter(tmp_path, tiny_backbone8).budget_thresholds
    flops = {b: evaluate_dynamic(m, x, y, thr)["flops_fraction"] for b, thr in curve.items()}
    picked = []
    for r in np.linspace(0.25, 1.2, 20):
        expected = max(b for b in curve if b <= r + 1e-9) if r >= min(curve) else min(curve)
        assert thresholds_for_budget(curve, float(r)) == curve[expected]
        assert flops[expected] <= max(r, min(curve)) + 1e-6  # the picked calibration holds on val
        picked.append(expected)
    assert picked == sorted(picked) and picked[0] == 0.3 and picked[-1] == 1.0
    assert flops[1.0] > flops[0.3]  # a larger budget buys deeper exits


def test_thresholds_for_budget_boundaries():
    curve = {0.3: [0.1], 0.5: [0.5], 1.0: [0.9]}
    got = [thresholds_for_budget(curve, b) for b in (0.1, 0.3, 0.49, 0.5, 0.99, 1.0, 1.5)]
    assert got == [[0.1], [0.1], [0.1], [0.5], [0.5], [0.9], [0.9]]
    thresholds_for_budget(curve, 0.5).append(7)  # a copy: the cached curve is not mutable through it
    assert curve[0.5] == [0.5]
    for bad in (0, -1, float("nan"), 2.0, True):
        with pytest.raises(PetlError, match="fraction of the full-depth FLOPs"):
            thresholds_for_budget(curve, bad)


# ----------------------------------------------------------------- refused, older artifacts
@pytest.mark.parametrize("corrupt, message", [
    (lambda c: c["budget_thresholds"].update({"0.5": [0.5, 0.6]}),
     r"budget_thresholds\['0.5'\] must be a list of 3 finite"),
    (lambda c: c["budget_thresholds"].update({"0.5": [0.5, float("nan"), 0.6]}), "must be a list of 3 finite"),
    (lambda c: c["budget_thresholds"].update({"0.5": "0.5,0.6,0.7"}), "must be a list of 3 finite"),
    (lambda c: c["budget_thresholds"].update({"0.5": [0.5, True, 0.6]}), "must be a list of 3 finite"),
    (lambda c: c["budget_thresholds"].update({"fast": [0.5, 0.6, 0.7]}), "key 'fast' is not a FLOPs budget"),
    (lambda c: c["budget_thresholds"].update({"3.0": [0.5, 0.6, 0.7]}), "key '3.0' is not a FLOPs budget"),
    (lambda c: c.update(budget_thresholds=[[0.5, 0.6, 0.7]]), "must map a FLOPs budget to thresholds"),
])
def test_corrupted_curve_is_refused(dyn, calibration, tiny_backbone8, tmp_path, corrupt, message):
    m, _, _ = dyn
    _saved(m, tmp_path, calibration)
    _edit(tmp_path, corrupt)
    with pytest.raises(PetlError, match=message) as err:
        load_adapter(tmp_path, tiny_backbone8)
    assert CONFIG in str(err.value) and "explicit thresholds" in str(err.value)


def test_curve_on_a_static_method_is_refused(dyn, calibration, tiny_backbone8, tmp_path):
    m = build_model("linear", tiny_backbone8, 6)
    _saved(m, tmp_path, {})
    _edit(tmp_path, lambda c: c.update(budget_thresholds=calibration["budget_thresholds"]))
    with pytest.raises(PetlError, match=r"only for early-exit methods \(dyn_\*\)"):
        load_adapter(tmp_path, tiny_backbone8)


def test_save_refuses_a_malformed_curve(dyn, tmp_path):
    m, _, _ = dyn
    with pytest.raises(PetlError, match="must be a list of 3 finite"):
        save_adapter(m, tmp_path, extra={"budget_thresholds": {"0.5": [0.5]}})
    assert not (tmp_path / CONFIG).exists()


def test_older_artifact_loads_without_a_curve(dyn, calibration, tiny_backbone8, tmp_path):
    m, _, _ = dyn
    _saved(m, tmp_path, calibration)
    _edit(tmp_path, lambda c: [c.pop("budget_thresholds"), c.pop("budget_calibration")])
    loaded = load_adapter(tmp_path, tiny_backbone8)
    assert loaded.budget_thresholds == {} and loaded.budget_calibration == {}
    with pytest.raises(PetlError, match=r"saved without a budget calibration \(an older artifact\): "
                                        "send explicit thresholds"):
        thresholds_for_budget(loaded.budget_thresholds, 0.5)


def test_bf16_model_is_fed_its_own_dtype(tiny_backbone8, dyn):
    """A model cast to bf16 (as a replica does) calibrates from float32 images without a dtype error."""
    import copy

    m, x, y = dyn
    half = copy.deepcopy(m).to(torch.bfloat16)
    out = budget_curve(half, x[:32], y[:32], budgets=(0.5,))
    assert len(out["budget_thresholds"]["0.5"]) == m.stages - 1


# ----------------------------------------------------------------- written by training
def _folder_task(root, per_class=6):
    """A 3-class ImageFolder task (train / val / test) of flat-coloured noisy 16 px images."""
    rng = np.random.default_rng(0)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for split in ("train", "val", "test"):
        for c, colour in enumerate(colours):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                img = np.clip(np.array(colour) + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")
    return f"folder:{root}"


def test_finetune_writes_the_curve(tiny_backbone8, tmp_path, monkeypatch):
    import sys

    from petl_platform.training.run import finetune

    cal = sys.modules["petl_platform.methods.dyn_exit.calibrate"]
    passes = []
    real = cal.exit_probabilities
    monkeypatch.setattr(cal, "exit_probabilities", lambda *a, **k: passes.append(1) or real(*a, **k))
    task = _folder_task(tmp_path / "data")
    model, res = finetune(task, "dyn_linear", "tiny", train_overrides={"epochs": 1, "device": "cpu", "progress": False},
                          out=str(tmp_path / "a"), backbone_model=tiny_backbone8, budget=0.5)
    assert len(passes) == 1  # one val pass serves both --budget and the stored curve
    cfg = json.loads((tmp_path / "a" / CONFIG).read_text())
    assert cfg["budget_calibration"]["samples"] == 18 and cfg["budget_calibration"]["split"] == "val"
    assert all(len(t) == model.stages - 1 for t in cfg["budget_thresholds"].values())
    loaded = load_adapter(tmp_path / "a", tiny_backbone8)
    assert sorted(loaded.budget_thresholds) == list(BUDGETS)
    assert loaded.exit_thresholds.tolist() == pytest.approx(res["calibration"]["thresholds"])  # --budget's own


def test_trial_checkpoints_carry_the_curve(tmp_path, monkeypatch):
    """``run_trial`` without Ray (its report / checkpoint functions faked), MLflow on SQLite: every
    epoch's checkpointed adapter carries the curve (an ASHA-stopped trial registers its last one),
    from the val pass the per-epoch exit statistics already make."""
    import sys

    from platform_stack import sqlite_store, write_tiny_backbone

    from petl_platform.backbones import create_backbone
    from petl_platform.tracking.settings import TrackingSettings
    from petl_platform.training.trial import run_trial, trial_config

    backbone = write_tiny_backbone(tmp_path)
    settings = TrackingSettings(sqlite_store(tmp_path / "m.db", str(tmp_path / "art")), str(tmp_path / "art"),
                                str(tmp_path / "ray"))
    config = trial_config(_folder_task(tmp_path / "data", per_class=4), "dyn_linear", backbone, settings, "calib",
                          hparams={"stages": 2}, train={"epochs": 2, "device": "cpu", "batch_size": 6})
    reports, passes = [], []
    cal = sys.modules["petl_platform.methods.dyn_exit.calibrate"]
    real = cal.exit_probabilities
    monkeypatch.setattr(cal, "exit_probabilities", lambda *a, **k: passes.append(1) or real(*a, **k))

    class Checkpoint:
        @staticmethod
        def from_directory(d):
            dest = tmp_path / f"ckpt{len(reports)}"
            shutil.copytree(d, dest)
            return dest

    run_trial(config, report=lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)),
              get_checkpoint=lambda: None, checkpoint_cls=Checkpoint)
    assert len(reports) == 2 and "exit_accuracy" in reports[-1][0]  # the per-epoch exit statistics still come
    assert len(passes) == 2  # one val pass per epoch serves the statistics and the curve
    bb = create_backbone(backbone)
    for _, ckpt in reports:
        cfg = json.loads((ckpt / "adapter" / CONFIG).read_text())
        assert cfg["budget_calibration"]["samples"] == 12
        assert all(len(t) == 1 for t in cfg["budget_thresholds"].values())  # stages=2: one early exit
        assert sorted(load_adapter(ckpt / "adapter", bb).budget_thresholds) == list(BUDGETS)

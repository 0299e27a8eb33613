"""Champion and challenger: every registration becomes alias ``challenger``; ``champion`` moves only
when there is none, when the challenger is at least as good on the same val split, or when forced.
Real MLflow registry (SQLite + a local artifact store), tiny adapters, no Ray."""

from __future__ import annotations

import mlflow
import pytest

from petl_platform.cli import main
from petl_platform.tracking.runs import CHALLENGER, PROMOTION_TAG, SPLIT_TAG, register_challenger

SPLIT = "digits-1k:val176:0123456789"


@pytest.fixture
def registry(tmp_path):
    from petl_platform.tracking.settings import TrackingSettings

    from platform_stack import sqlite_store  # a migrated template's copy: no 5-15 s of migrations per test

    art = str(tmp_path / "art")
    return TrackingSettings(sqlite_store(tmp_path / "m.db", art), art, str(tmp_path / "ray")).prepare()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_backbone):
    from petl_platform.methods import build_model
    from petl_platform.tracking.artifacts import save_adapter

    d = tmp_path_factory.mktemp("adapter")
    save_adapter(build_model("linear", tiny_backbone, 3), d, task="t", classes=["a", "b", "c"])
    return d


def _run(settings, adapter_dir) -> str:
    from petl_platform.tracking.runs import ADAPTER_PATH, RunLogger

    with RunLogger(settings, "champion-tests") as run:
        run.log_artifacts(adapter_dir, ADAPTER_PATH)
    return run.run_id


def _register(settings, adapter_dir, value, split=SPLIT, promote=False, name="t"):
    return register_challenger(settings, _run(settings, adapter_dir), name, value=value, split_id=split,
                               promote=promote, tags={"task": name})


def _state(settings, name="t") -> tuple[dict, dict]:
    c = mlflow.MlflowClient(settings.tracking_uri)
    rm = c.get_registered_model(name)
    return {a: int(v) for a, v in rm.aliases.items()}, dict(rm.tags)


def _version_tags(settings, version, name="t") -> dict:
    return dict(mlflow.MlflowClient(settings.tracking_uri).get_model_version(name, str(version)).tags)


def test_first_version_becomes_champion_and_challenger(registry, adapter_dir):
    r = _register(registry, adapter_dir, 0.70)
    assert (r["version"], r["champion_moved"], r["decision"], r["previous_champion"]) == (1, True, "first", None)
    assert _state(registry)[0] == {"champion": 1, CHALLENGER: 1}
    tags = _version_tags(registry, 1)
    assert tags["val_accuracy"] == "0.7" and tags[SPLIT_TAG] == SPLIT and tags["task"] == "t"
    assert tags[PROMOTION_TAG].startswith("first: no champion yet")


def test_worse_challenger_keeps_the_champion_and_says_why(registry, adapter_dir):
    _register(registry, adapter_dir, 0.699)
    r = _register(registry, adapter_dir, 0.585)
    assert (r["version"], r["champion_moved"], r["champion_version"], r["decision"]) == (2, False, 1, "kept")
    assert _state(registry)[0] == {"champion": 1, CHALLENGER: 2}
    reason = _version_tags(registry, 2)[PROMOTION_TAG]
    assert reason == r["reason"] and "0.5850 < champion v1 val_accuracy 0.6990" in reason and SPLIT in reason
    assert _state(registry)[1][PROMOTION_TAG] == f"v2 {reason}"  # the model carries the latest decision too


@pytest.mark.parametrize("value", [0.70, 0.71])
def test_equal_or_better_challenger_moves_the_champion(registry, adapter_dir, value):
    _register(registry, adapter_dir, 0.70)
    r = _register(registry, adapter_dir, value)
    assert (r["champion_moved"], r["champion_version"], r["previous_champion"], r["decision"]) == (True, 2, 1, "promoted")
    assert _state(registry)[0] == {"champion": 2, CHALLENGER: 2}
    assert ">= champion v1 val_accuracy 0.7000" in _version_tags(registry, 2)[PROMOTION_TAG]


def test_different_val_split_never_moves_the_champion(registry, adapter_dir):
    _register(registry, adapter_dir, 0.50, split="digits:val180:aaaaaaaaaa")
    r = _register(registry, adapter_dir, 0.99)
    assert (r["champion_moved"], r["decision"]) == (False, "kept")
    assert _state(registry)[0] == {"champion": 1, CHALLENGER: 2}
    assert "not comparable" in r["reason"] and "digits:val180:aaaaaaaaaa" in r["reason"]


def test_champion_without_metric_tags_is_not_auto_replaced(registry, adapter_dir):
    from petl_platform.tracking.runs import register_adapter

    register_adapter(registry, _run(registry, adapter_dir), "t")  # registered before this rule: no tags
    r = _register(registry, adapter_dir, 0.99)
    assert (r["champion_moved"], r["champion_version"]) == (False, 1) and "no val_accuracy tag" in r["reason"]


def test_promote_forces_the_move(registry, adapter_dir):
    _register(registry, adapter_dir, 0.70)
    r = _register(registry, adapter_dir, 0.10, split="other:val9:bbbbbbbbbb", promote=True)
    assert (r["champion_moved"], r["decision"]) == (True, "forced")
    assert _state(registry)[0] == {"champion": 2, CHALLENGER: 2}
    assert _version_tags(registry, 2)[PROMOTION_TAG].startswith("forced: challenger v2")


def test_bad_values_fail_before_registering(registry, adapter_dir):
    from petl_platform.errors import PetlError

    with pytest.raises(PetlError, match="not a number"):
        _register(registry, adapter_dir, float("nan"))
    with pytest.raises(PetlError, match="reserved"):
        register_challenger(registry, _run(registry, adapter_dir), "t", value=0.5, split_id=SPLIT, champion=CHALLENGER)
    assert mlflow.MlflowClient(registry.tracking_uri).search_registered_models() == []


def test_manual_registry_promote_records_manual(registry, adapter_dir, capsys):
    _register(registry, adapter_dir, 0.70)
    _register(registry, adapter_dir, 0.50)  # kept: champion stays v1
    assert main(["registry", "promote", "t", "2", "--tracking-uri", registry.tracking_uri]) == 0
    assert _state(registry)[0] == {"champion": 2, CHALLENGER: 2}
    reason = _version_tags(registry, 2)[PROMOTION_TAG]
    assert reason.startswith("manual: champion moved to v2") and "(was v1)" in reason
    assert _state(registry)[1][PROMOTION_TAG] == f"v2 {reason}" and reason in capsys.readouterr().out


def test_val_split_id_is_stable_and_tells_splits_apart():
    from petl_platform.data import get_task
    from petl_platform.training.run import val_split_id

    a, b = val_split_id("digits-1k"), val_split_id("digits")
    assert a == val_split_id("digits-1k") and a != b
    assert a.rsplit(":", 1)[0] == f"digits-1k:val{len(get_task('digits-1k').splits['val'][1])}"


def test_register_run_tags_the_split_the_sweep_and_train_compare_on(registry, adapter_dir):
    from petl_platform.training.run import register_run, val_split_id

    r = register_run(registry, "digits-1k", "linear", _run(registry, adapter_dir), 0.6, tags={"sweep": "s1"})
    assert (r["name"], r["decision"], r["val_split"]) == ("digits-1k", "first", val_split_id("digits-1k"))
    tags = _version_tags(registry, 1, "digits-1k")
    assert tags[SPLIT_TAG] == r["val_split"] and tags["method"] == "linear" and tags["sweep"] == "s1"


def test_sweep_cli_prints_the_decision(monkeypatch, capsys, registry):
    import petl_platform.cluster.tune as sweep

    reg = {"name": "t", "version": 4, "alias": "champion", "champion_moved": False, "champion_version": 3,
           "decision": "kept", "reason": "kept: challenger v4 val_accuracy 0.5850 < champion v3 val_accuracy 0.6990"}
    seen = {}

    def fake_run_sweep(spec):
        seen.update(promote=spec.promote)
        return [{"task": spec.tasks[0], "method": spec.method, "trials": [{}], "trial_epochs": 1, "grid_epochs": 1,
                 "best": {"val_accuracy": 0.585, "params": {}}, "registered": reg}]

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    assert main(["sweep", "--task", "digits-1k", "--promote", "--tracking-uri", registry.tracking_uri]) == 0
    out = capsys.readouterr().out
    assert seen["promote"] is True
    assert "models:/t@challenger (champion stays v3) (version 4): kept: challenger v4" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "digits-1k", "--local", "--register"], "--register needs the MLflow run"),
    (["train", "--task", "digits-1k", "--promote"], "add --register"),
])
def test_train_register_misuse_is_one_line_before_training(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

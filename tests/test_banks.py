"""Adapter banks: resident per-row tasks as slots of stacked tensors, admitted from flat tensors
without a module tree; every answer equals its task run alone within 1e-5 (fp32), whatever shares
its batch: every banked family, mixed N, uneven rows, several banks, both gather modes."""

import gc
import random

import pytest
import torch

from petl_platform import PetlError, build_model, get_method, list_methods
from petl_platform.inference import Engine, Row
from petl_platform.inference.banks import BankedTask
from test_engine import ATOL, _alone, _make

BANKED = [m for m in list_methods() if get_method(m).bank is not None]


def _state(model):
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def _admit(engine, model):
    bt = engine.admit(model.method, model.config.to_dict(), model.num_classes, _state(model))
    assert isinstance(bt, BankedTask)
    return bt


def test_every_per_row_method_has_a_bank_layout():
    per_row = {m for m in list_methods() if get_method(m).runtime in ("per_row_adapter", "early_exit")}
    assert per_row == set(BANKED) and {"lora", "adapter", "repadapter", "arc", "dyn_lora"} <= per_row
    assert all(get_method(m).bank is None for m in list_methods() if m not in per_row)


@pytest.mark.parametrize("gather", ["rows", "segments"])
@pytest.mark.parametrize("method", BANKED)
def test_banked_tasks_equal_each_task_alone(method, gather, tiny_backbone8):
    """N banked tasks of one method (two architectures: two banks), uneven rows, interleaved."""
    hp = {"rank": 2} if "lora" in method or "arc" in method else {"bottleneck": 4} if "adapter" in method else {}
    models = {f"t{i}": _make(method, tiny_backbone8, 40 + i) for i in range(4)}
    models["odd"] = _make(method, tiny_backbone8, 49, **hp)  # another shape: its own bank
    engine = Engine(tiny_backbone8, merge_cache=0, gather=gather)
    tasks = {t: _admit(engine, m) for t, m in models.items()}
    torch.manual_seed(5)
    images = torch.randn(7, 3, 32, 32)
    rnd = random.Random(7)
    early = get_method(method).runtime == "early_exit"
    rows = []
    for i in range(15):
        t = rnd.choice(list(models))
        knobs = {"thresholds": [rnd.choice([0.0, 0.5, 2.0]) for _ in range(models[t].stages - 1)]} if early else {}
        rows.append(Row(i % 7, t, knobs))
    results = engine.run(images, rows, tasks)
    assert engine.last_stats["banks"] == (2 if hp else 1)  # class counts 3..5 share a bank (padded heads)
    for r, got in zip(rows, results):
        want, stages = _alone(models[r.task], images[r.image:r.image + 1], dict(r.knobs))
        torch.testing.assert_close(got.logits, want[0].float(), rtol=0, atol=ATOL, msg=f"{method} {r}")
        if stages is not None:
            assert got.exit_stage == stages[0], r


def test_every_banked_family_in_one_batch_with_module_tasks(tiny_backbone8):
    """Banks of every family, DTL / linear / DyT rows beside them: one batch, each row its own answer."""
    models = {m: _make(m, tiny_backbone8, 60 + i) for i, m in enumerate(BANKED)}
    others = {m: _make(m, tiny_backbone8, 80 + i) for i, m in enumerate(("linear", "dtl", "dyt"))}
    engine = Engine(tiny_backbone8, merge_cache=0)
    tasks = {**{t: _admit(engine, m) for t, m in models.items()}, **others}
    torch.manual_seed(6)
    images = torch.randn(5, 3, 32, 32)
    rows = [Row(i % 5, t) for i, t in enumerate(list(tasks) * 2)]
    results = engine.run(images, rows, tasks)
    assert engine.last_stats["banks"] == len(BANKED)
    for r, got in zip(rows, results):
        want, _ = _alone({**models, **others}[r.task], images[r.image:r.image + 1], {})
        if get_method(r.task).runtime == "early_exit":  # calibrated thresholds unset: full depth
            assert got.exit_stage == models[r.task].stages
        torch.testing.assert_close(got.logits, want[0].float(), rtol=0, atol=ATOL, msg=r.task)


def test_a_bank_grows_and_reuses_freed_slots(tiny_backbone8):
    engine = Engine(tiny_backbone8, merge_cache=0)
    models = [_make("lora", tiny_backbone8, 100 + i) for i in range(11)]
    tasks = [_admit(engine, m) for m in models]
    bank = tasks[0].bank
    assert {t.bank for t in tasks} == {bank} and bank.capacity == 16 and bank.used == 11  # 8 slots, doubled once
    x = torch.randn(11, 3, 32, 32)
    got = engine.run(x, [Row(i, f"t{i}") for i in range(11)], {f"t{i}": t for i, t in enumerate(tasks)})
    for i, r in enumerate(got):  # the first eight survived the growth
        torch.testing.assert_close(r.logits, _alone(models[i], x[i:i + 1], {})[0][0], rtol=0, atol=ATOL)
    freed = tasks[3].slot
    del tasks[3], got
    gc.collect()
    assert bank.used == 10
    again = _admit(engine, models[3])
    assert again.slot == freed and engine.bank_stats()[0]["used"] == 11
    assert engine.bank_stats()[0]["slots"] == 16


def test_a_model_passed_directly_is_banked_and_follows_in_place_changes(tiny_backbone8):
    engine = Engine(tiny_backbone8, merge_cache=0)
    models = {"a": _make("lora", tiny_backbone8, 1), "b": _make("lora", tiny_backbone8, 2)}
    x = torch.randn(2, 3, 32, 32)
    rows = [Row(0, "a"), Row(1, "b")]
    before = engine.run(x, rows, models)
    assert engine.last_stats["banks"] == 1
    with torch.no_grad():
        models["a"].head.weight.mul_(2.0)  # trained further, in place
    after = engine.run(x, rows, models)
    torch.testing.assert_close(after[0].logits, _alone(models["a"], x[:1], {})[0][0], rtol=0, atol=ATOL)
    assert not torch.allclose(after[0].logits, before[0].logits)
    torch.testing.assert_close(after[1].logits, before[1].logits, rtol=0, atol=0)


def test_a_state_that_does_not_fit_is_refused(tiny_backbone8):
    engine = Engine(tiny_backbone8)
    m = _make("lora", tiny_backbone8, 3)
    state = _state(m)
    with pytest.raises(PetlError, match="does not fit method 'lora'"):
        engine.admit("lora", m.config.to_dict(), m.num_classes, {k: v for k, v in list(state.items())[1:]})
    k = next(iter(state))
    with pytest.raises(PetlError, match=f"tensor {k} has shape"):
        engine.admit("lora", m.config.to_dict(), m.num_classes, {**state, k: torch.zeros(1)})
    with pytest.raises(PetlError, match="rank must be"):
        engine.admit("lora", {"rank": 0}, 3, state)
    assert engine.admit("linear", {}, 3, _state(build_model("linear", tiny_backbone8, 3))) is None  # no bank: a module


def test_banked_dyn_task_keeps_its_calibrated_thresholds(tiny_backbone8):
    m = _make("dyn_lora", tiny_backbone8, 9)
    with torch.no_grad():
        m.exit_thresholds.copy_(torch.tensor([0.0, 2.0, 2.0]))  # calibrated: every row leaves at exit 1
    engine = Engine(tiny_backbone8, merge_cache=0)
    bt = _admit(engine, m)
    assert bt.exit_thresholds_for().tolist() == [0.0, 2.0, 2.0] and bt.stages == 4
    x = torch.randn(3, 3, 32, 32)
    got = engine.run(x, [Row(i, "d") for i in range(3)], {"d": bt})
    assert [r.exit_stage for r in got] == [1, 1, 1]
    want = m.predict_dynamic(x)
    torch.testing.assert_close(torch.stack([r.logits for r in got]), want["logits"].float(), rtol=0, atol=ATOL)


def test_a_banked_task_alone_in_its_batches_runs_merged(tiny_backbone8):
    m = _make("lora", tiny_backbone8, 11)
    engine = Engine(tiny_backbone8, merge_cache=1)
    bt = _admit(engine, m)
    x = torch.randn(3, 3, 32, 32)
    for _ in range(4):
        got = engine.run(x, [Row(i, "t") for i in range(3)], {"t": bt})
    assert engine.last_stats["banks"] == 0 and len(engine._merged) == 1  # the merged copy ran the last batches
    torch.testing.assert_close(torch.stack([r.logits for r in got]), m(x).detach(), rtol=0, atol=ATOL)

"""The fair basis through ``petl sweep`` (bench/fair_sweep.py): its grids, each task's choice, the
recipe chosen across tasks and the gap it leaves. Pure functions over sweep rows, no training."""

import json

import pytest

from platform_stack import bench_module

FAIR = bench_module("fair_sweep")


def _sweep(task, method="lora", trials=(), epochs=10, key="rank", values=(4, 8, 16)):
    grid = {"lr": [0.005, 0.015, 0.045], key: list(values)}
    rows = [{"params": {"lr": lr, key: r}, "epochs": ep, "val_accuracy": val,
             "test_accuracy": test if ep == epochs else None} for (lr, r, ep, val, test) in trials]
    return {"phase": "sweep", "method": method, "task": task, "recipe_lr": 0.015, "grid": grid, "epochs": epochs,
            "trials": rows, "trial_epochs": sum(t["epochs"] for t in rows), "grid_epochs": 9 * epochs, "wall_s": 1.0}


@pytest.mark.parametrize("method", FAIR.METHODS)
def test_each_grid_has_todays_recipe_lr_and_default_in_its_middle(method):
    from petl_platform.methods import get_method
    from petl_platform.training.loop import TrainConfig
    from petl_platform.training.space import parse_space

    g = FAIR.grid(method, FAIR.recipe_lr(method))
    assert len(g) == 2 and all(len(v) == 3 for v in g.values())
    assert g["lr"][1] == pytest.approx(FAIR.recipe_lr(method))
    key, values = FAIR.SECOND[method]
    spec = get_method(method)
    train, cfg = TrainConfig.from_dict(spec.recipe, "training"), spec.config_cls()
    today = getattr(train, key) if hasattr(train, key) else getattr(cfg, key)  # the recipe's, else the method's
    # the grid's middle is the default the basis started from; where the basis moved it (Dyn-Adapter's
    # p_m), today's default is the basis's choice (tests/test_sweep_space.py checks the whole recipe)
    moved = FAIR.basis()["methods"].get(method, {}).get("recipe", {})
    assert (moved[key] if key in moved else values[1]) == pytest.approx(today), (method, key, values, today)
    # every point is a valid config of the method (what petl sweep checks before any trial starts)
    assert set(parse_space(FAIR.space_items(g), method)) == {"lr", key}


def test_a_task_choice_is_the_best_val_among_trials_that_ran_every_epoch():
    s = _sweep("a", trials=[(0.005, 4, 3, 0.95, None),  # stopped by ASHA at a rung: not a choice
                            (0.015, 8, 10, 0.80, 0.78), (0.045, 16, 10, 0.82, 0.79), (0.045, 8, 10, 0.82, 0.81)])
    # a tie in val goes to the point nearer the grid's middle
    assert FAIR.task_choice(s)["params"] == {"lr": 0.045, "rank": 8}


def test_the_recipe_is_the_median_of_the_tasks_choices_per_hyperparameter():
    rate = {"key": "p_m", "values": (0.0, 0.1, 0.2)}
    picks = [(0.045, 0.2), (0.045, 0.0), (0.015, 0.2), (0.045, 0.2)]
    sweeps = [_sweep(f"t{i}", trials=[(lr, r, 10, 0.9, 0.9)], **rate) for i, (lr, r) in enumerate(picks)]
    assert FAIR.choose_recipe(sweeps) == {"lr": 0.045, "p_m": 0.2}
    # two tasks each way: the median falls between two positions and goes to the middle (today's)
    sweeps = [_sweep(f"t{i}", trials=[(lr, r, 10, 0.9, 0.9)], **rate) for i, (lr, r) in
              enumerate([(0.005, 0.0), (0.005, 0.0), (0.045, 0.2), (0.045, 0.2)])]
    assert FAIR.choose_recipe(sweeps) == {"lr": 0.015, "p_m": 0.1}
    # three tasks on one side of the middle, one on the other: not the middle
    sweeps = [_sweep(f"t{i}", trials=[(lr, r, 10, 0.9, 0.9)], **rate) for i, (lr, r) in
              enumerate([(0.005, 0.0), (0.005, 0.0), (0.005, 0.0), (0.045, 0.2)])]
    assert FAIR.choose_recipe(sweeps) == {"lr": 0.005, "p_m": 0.0}


def test_a_recipe_keeps_todays_shape_whatever_the_tasks_chose():
    sweeps = [_sweep(f"t{i}", trials=[(0.045, 16, 10, 0.9, 0.9)]) for i in range(4)]
    assert FAIR.choose_recipe(sweeps) == {"lr": 0.045, "rank": 8}


def test_the_gap_reads_the_recipes_own_run_from_the_sweep_or_a_recipe_run():
    tasks = ["t0", "t1"]
    s0 = _sweep("t0", trials=[(0.045, 16, 10, 0.90, 0.88), (0.015, 8, 10, 0.85, 0.86)])
    s1 = _sweep("t1", trials=[(0.015, 8, 10, 0.70, 0.69), (0.045, 16, 3, 0.60, None), (0.005, 4, 10, 0.65, 0.66)])
    # t0 chose (0.045, 16), t1 (0.015, 8): a tie per key, so the recipe is the middle, (0.015, 8)
    agg = FAIR.aggregate([s0, s1], methods=["lora"], tasks=tasks)
    m = agg["methods"]["lora"]
    assert m["recipe"] == {"lr": 0.015, "rank": 8} and m["lr_multiple"] == pytest.approx(1.0)
    assert m["gaps"]["t0"]["test_gap_pt"] == pytest.approx(2.0) and m["gaps"]["t0"]["from"] == "sweep"
    assert m["gaps"]["t1"]["test_gap_pt"] == pytest.approx(0.0)
    assert m["met"] is False and agg["cells_done"] == 2

    # Both tasks now choose x3: the median (0.045, 8) is not today's (0.015, 8), so the recipe waits
    # for both candidates' 10-epoch runs on every task; ASHA stopped (0.015, 8) on t1 and never
    # ran (0.045, 8) to its end anywhere.
    s1["trials"] = [t for t in s1["trials"] if t["params"] != {"lr": 0.015, "rank": 8}]
    s1["trials"].append({"params": {"lr": 0.045, "rank": 4}, "epochs": 10, "val_accuracy": 0.75, "test_accuracy": 0.7})
    median, today = {"lr": 0.045, "rank": 8}, {"lr": 0.015, "rank": 8}
    assert FAIR.candidates([s0, s1]) == [median, today]
    m = FAIR.aggregate([s0, s1], methods=["lora"], tasks=tasks)["methods"]["lora"]
    assert "recipe" not in m and [c["runs"] for c in m["candidates"]] == [0, 1]

    def run(task, params, val, test):
        return {"phase": "recipe", "method": "lora", "task": task, "params": params, "epochs": 10,
                "val_accuracy": val, "test_accuracy": test}

    # the bench's own runs fill them in; the median does better on mean val: it is the recipe
    rows = [s0, s1, run("t0", median, 0.89, 0.87), run("t1", median, 0.74, 0.695), run("t1", today, 0.60, 0.6)]
    m = FAIR.aggregate(json.loads(json.dumps(rows)), methods=["lora"], tasks=tasks)["methods"]["lora"]
    assert m["recipe"] == median and m["lr_multiple"] == pytest.approx(3.0)
    g = m["gaps"]["t1"]
    assert g["from"] == "recipe run" and g["test_gap_pt"] == pytest.approx(0.5)
    # today's does better on mean val (a median that pairs an lr with a setting it was not chosen
    # with can collapse): today's stays
    rows[-1] = run("t1", today, 0.80, 0.79)
    m = FAIR.aggregate(json.loads(json.dumps(rows)), methods=["lora"], tasks=tasks)["methods"]["lora"]
    assert m["recipe"] == today and m["gaps"]["t0"]["from"] == "sweep" and m["gaps"]["t1"]["from"] == "recipe run"


def test_the_report_shows_each_choice_the_recipes_gaps_and_what_is_not_run_yet():
    report = bench_module("report")
    tasks = ["t0", "t1"]
    rows = [_sweep("t0", trials=[(0.045, 16, 10, 0.90, 0.88), (0.015, 8, 10, 0.85, 0.86)]),
            _sweep("t1", trials=[(0.015, 8, 10, 0.70, 0.69)]),
            _sweep("t0", method="linear", trials=[(0.015, 8, 10, 0.5, 0.4)])]
    fs = FAIR.aggregate(rows, methods=["linear", "lora"], tasks=tasks)
    fs["second"] = {"linear": "rank", "lora": "rank"}  # the synthetic rows search rank for both
    text = "\n".join(report.fair_sweep_md(fs))
    assert "**3 of 4 sweeps done**" in text
    assert "| lora | lr, rank | lr 0.045, rank 16: 88.0 (90.0) | lr 0.015, rank 8: 69.0 (70.0) |" in text
    assert "| linear | lr, rank | lr 0.015, rank 8: 40.0 (50.0) | not run yet |" in text
    # only lora has every task: its recipe row, with the gap on t0 and none on t1
    assert "| lora | lr 0.015, rank 8 (lr x1) | +2.0 pt (+5.0) | +0.0 pt (+0.0) | 78.5 / 77.5 | **missed** |" in text
    assert "| linear | lr" not in text.split("The recipe per method")[1]


def test_the_goals_table_gets_an_r1_row_from_the_sweep_basis(tmp_path):
    report = bench_module("report")
    rows = [_sweep("t0", trials=[(0.045, 16, 10, 0.90, 0.88), (0.015, 8, 10, 0.85, 0.86)]),
            _sweep("t1", trials=[(0.015, 8, 10, 0.70, 0.69)])]
    (tmp_path / "fair_sweep.json").write_text(json.dumps(FAIR.aggregate(rows, methods=["lora"], tasks=["t0", "t1"])))
    [r1] = [f for f in report.figures(tmp_path) if f["source"] == "fair_sweep.json"]
    assert r1["id"] == "R1" and r1["median"] == pytest.approx(2.0) and r1["met"] is False
    assert "0 of 1 methods within 1 pt" in r1["note"] and "2 of 2 sweeps done" in r1["note"]

"""Each method's recipe lr, chosen on the fair fidelity basis, and the gap it leaves per task.

The fair basis (``bench/fidelity.py --fair``) trained every method for 10 epochs on each offline task
at a grid of lrs (the recipe's then x 1/3, x 1, x 3, grown by x 3 past a winning end), seed 0, and
kept each run's val and test accuracy in ``fidelity_fair_runs.jsonl``. From those runs:

- **the recipe lr** of a method is the lr, among those run on every task, with the best mean val
  accuracy across the tasks: one lr that wins on val across the offline tasks (``choose``);
- **the gap** per task is the per-task tuned run (the best val lr on that task) minus the run at
  the recipe lr, in test and val accuracy points: what ``petl train`` at the defaults and 10 epochs
  gives up against tuning the lr for that task (goal: within 1 pt).

Every number is read from the runs file, nothing is trained here: the recipes in the method specs
must equal ``choose``'s lrs (``tests/test_sweep_space.py`` checks it). Writes ``recipe_lr.json``.

    .venv/bin/python bench/recipe_lr.py [--runs FILE] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# the fair basis the recipes were chosen on (10 epochs, the shipped backbone, 2 offline tasks)
FAIR_RUNS = RESULTS / "2026-12-02" / "fidelity_fair_runs.jsonl"
GOAL_PT = 1.0


def load(path: Path = FAIR_RUNS) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _key(lr: float) -> float:
    return float(f"{lr:.6g}")  # 0.009999999999999998 and 0.01 are the same grid point


def choose(rows: list[dict]) -> dict:
    """``{method: {"lr", "tasks", "per_task": {task: {...}}}}`` from the lr-selection runs (seed 0)."""
    runs: dict = {}
    for r in rows:
        if r.get("phase") == "sweep" and r["seed"] == 0:
            runs.setdefault(r["method"], {}).setdefault(r["task"], {})[_key(r["lr"])] = r
    out = {}
    for method, tasks in sorted(runs.items()):
        common = set.intersection(*(set(by_lr) for by_lr in tasks.values()))
        lr = max(sorted(common), key=lambda v: sum(tasks[t][v]["val_accuracy"] for t in tasks) / len(tasks))
        per_task = {}
        for task, by_lr in sorted(tasks.items()):
            tuned_lr = max(sorted(by_lr), key=lambda v: by_lr[v]["val_accuracy"])
            tuned, default = by_lr[tuned_lr], by_lr[lr]
            per_task[task] = {"tuned_lr": tuned_lr, "tuned_multiple": tuned_lr / lr,
                              "tuned_test": tuned["accuracy"], "default_test": default["accuracy"],
                              "tuned_val": tuned["val_accuracy"], "default_val": default["val_accuracy"],
                              "test_gap_pt": 100 * (tuned["accuracy"] - default["accuracy"]),
                              "val_gap_pt": 100 * (tuned["val_accuracy"] - default["val_accuracy"])}
        out[method] = {"lr": lr, "tasks": sorted(tasks), "epochs": next(iter(tasks.values()))[lr]["epochs"],
                       "per_task": per_task, "met": all(p["test_gap_pt"] <= GOAL_PT for p in per_task.values())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(FAIR_RUNS), help="a fidelity_fair_runs.jsonl")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()

    from petl_platform.methods import get_method
    from petl_platform.training.loop import TrainConfig

    chosen = choose(load(Path(args.runs)))
    for method, c in chosen.items():
        c["recipe_lr"] = TrainConfig.from_dict(get_method(method).recipe, "training").lr
        c["recipe_matches"] = abs(c["recipe_lr"] - c["lr"]) <= 1e-9 * c["lr"]
        gaps = ", ".join(f"{t} {p['test_gap_pt']:+.1f} pt (tuned x{p['tuned_multiple']:.3g})"
                         for t, p in c["per_task"].items())
        print(f"{method:12} lr {c['lr']:.3g} (recipe {c['recipe_lr']:.3g}{'' if c['recipe_matches'] else ' DIFFERS'}): "
              f"test gap {gaps} -> {'met' if c['met'] else 'missed'}")
    out = {"runs": f"{Path(args.runs).parent.name}/{Path(args.runs).name}",
           "goal": f"petl train at the defaults, 10 epochs: test accuracy within {GOAL_PT:g} pt of the per-task "
                   "tuned lr's", "methods": chosen}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "recipe_lr.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

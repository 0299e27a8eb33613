"""P7 bench: an ASHA sweep vs the full grid over the same space, side by side in one run.

Both sweep one method on one offline task with the shipped backbone over the same grid, through
Ray Tune on a local cluster with the same concurrency: FIFO trains every point for all epochs;
ASHA (grace 1, Tune's default reduction factor 4) stops the weak points early. Reports the
trial-epochs each used and the best val accuracy each found. Goal: ASHA uses <= 1/3 of the grid's
compute with its best within 0.5 pt of the grid's best. Repeats use other seeds. Writes
bench/results/p7_asha_vs_grid.json.

The default is the setting users run: 27 grid points (p_shallow x p_deep x p_m) and 9 epochs.
``--quick`` (petl bench --quick) is a 12-point, 4-epoch smoke of the same code.

    nice .venv/bin/python bench/p7_asha_vs_grid.py [--method dyn_linear] [--epochs 9] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SPACE = ["p_shallow=grid(0.1,0.4,0.7)", "p_deep=grid(0.0,0.15,0.3)", "p_m=grid(0.0,0.1,0.2)"]  # 27 points
QUICK_SPACE = ["p_shallow=grid(0.1,0.4,0.7)", "p_m=grid(0.0,0.1,0.2,0.3)"]  # 12 points


def tune_default_reduction_factor() -> float:
    import inspect

    from ray.tune.schedulers import ASHAScheduler

    return inspect.signature(ASHAScheduler.__init__).parameters["reduction_factor"].default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits-1k")
    ap.add_argument("--method", default="dyn_linear", help="any Dyn-* method (the grid is over its drop rates)")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a 12-point grid (p_shallow x p_m), dyn_linear, the same "
                    "ASHA settings (petl bench --quick also passes --epochs 4)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON (and PNGs) go")
    args = ap.parse_args()
    space = QUICK_SPACE if args.quick else SPACE
    points = 1
    for item in space:
        points *= item.count(",") + 1
    if args.quick:
        args.method = "dyn_linear"
    os.environ.setdefault("PETL_HOME", tempfile.mkdtemp(prefix="petl-p7-"))
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    import ray

    from petl_platform.backbones.factory import SHIPPED
    from petl_platform.tracking.settings import TrackingSettings
    from petl_platform.cluster.connect import ensure_ray
    from petl_platform.training.spec import SweepSpec
    from petl_platform.cluster.tune import run_sweep

    settings = TrackingSettings.from_env()
    rf = tune_default_reduction_factor()
    ensure_ray()
    rounds = []
    try:
        for rep in range(args.repeats):
            row = {"seed": rep}
            for sched in ("fifo", "asha"):
                t0 = time.time()
                [s] = run_sweep(SweepSpec(tasks=(args.task,), method=args.method, backbone=SHIPPED, settings=settings,
                                          space=space, samples=1, epochs=args.epochs, train={"seed": rep},
                                          scheduler=sched, reduction_factor=rf, max_concurrent=args.concurrent,
                                          name=f"p7-{sched}-{rep}-{int(t0)}", register=False, progress=False))
                row[sched] = {"trial_epochs": s["trial_epochs"], "best_val_accuracy": s["best"]["val_accuracy"],
                              "best_params": s["best"]["params"], "wall_s": round(time.time() - t0, 1),
                              "trials_stopped_early": sum(t["stopped_early"] for t in s["trials"])}
                print(f"seed {rep} {sched:4}: {s['trial_epochs']:3d} trial-epochs, best val acc "
                      f"{s['best']['val_accuracy']:.4f} {s['best']['params']}, {row[sched]['wall_s']:.0f}s", flush=True)
            row["compute_ratio"] = row["asha"]["trial_epochs"] / row["fifo"]["trial_epochs"]
            row["best_gap_pt"] = 100 * (row["fifo"]["best_val_accuracy"] - row["asha"]["best_val_accuracy"])
            rounds.append(row)
    finally:
        ray.shutdown()
    ratio = statistics.median(r["compute_ratio"] for r in rounds)
    gap = statistics.median(r["best_gap_pt"] for r in rounds)
    out = {"task": args.task, "method": args.method, "space": space, "epochs": args.epochs, "grid_points": points,
           "reduction_factor": rf, "grace_period": 1,
           "concurrency": args.concurrent, "rounds": rounds, "compute_ratio_median": ratio, "best_gap_pt_median": gap,
           "goal": "compute <= 1/3 of the grid, best within 0.5 pt",
           "met": ratio <= 1 / 3 and gap <= 0.5}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "p7_asha_vs_grid.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nP7: ASHA used {ratio:.2f}x the grid's trial-epochs (goal <= 0.33); best val accuracy "
          f"{gap:+.2f} pt behind the grid (goal <= 0.5) -> {'met' if out['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()

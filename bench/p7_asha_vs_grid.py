"""P7 bench: an ASHA sweep vs the full grid over the same space, side by side in one run.

Both sweep ``dyn_lora`` on one offline task with the shipped backbone over the same grid
(p_shallow x p_m, 12 points), through Ray Tune on a local cluster with the same concurrency:
FIFO trains every point for all epochs; ASHA (grace 1, reduction factor 3) stops the weak points
early. Reports the trial-epochs each used and the best val accuracy each found. Goal: ASHA uses
<= 1/3 of the grid's compute with its best within 0.5 pt of the grid's best. Repeats use other
seeds. Writes bench/results/p7_asha_vs_grid.json.

    nice .venv/bin/python bench/p7_asha_vs_grid.py [--epochs 6] [--repeats 1]
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
SPACE = ["p_shallow=grid(0.1,0.4,0.7)", "p_m=grid(0.0,0.1,0.2,0.3)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits-1k")
    ap.add_argument("--method", default="dyn_lora")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="dyn_linear (exit heads over the frozen trunk): the same grid "
                    "and ASHA settings, cheaper epochs (petl bench --quick also passes --epochs 4)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON (and PNGs) go")
    args = ap.parse_args()
    if args.quick:
        args.method = "dyn_linear"
    os.environ.setdefault("PETL_HOME", tempfile.mkdtemp(prefix="petl-p7-"))
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    import ray

    from petl_platform.backbones.factory import SHIPPED
    from petl_platform.tracking.settings import TrackingSettings
    from petl_platform.training.distributed import ensure_ray
    from petl_platform.training.sweep import run_sweep

    settings = TrackingSettings.from_env()
    ensure_ray()
    rounds = []
    try:
        for rep in range(args.repeats):
            row = {"seed": rep}
            for sched in ("fifo", "asha"):
                t0 = time.time()
                [s] = run_sweep([args.task], args.method, SHIPPED, settings, space=SPACE, samples=1,
                                epochs=args.epochs, train={"seed": rep}, scheduler=sched,
                                max_concurrent=args.concurrent, name=f"p7-{sched}-{rep}-{int(t0)}",
                                register=False, progress=False)
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
    out = {"task": args.task, "method": args.method, "space": SPACE, "epochs": args.epochs, "grid_points": 12,
           "concurrency": args.concurrent, "rounds": rounds, "compute_ratio_median": ratio, "best_gap_pt_median": gap,
           "goal": "compute <= 1/3 of the grid, best within 0.5 pt",
           "met": ratio <= 1 / 3 and gap <= 0.5}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "p7_asha_vs_grid.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nP7: ASHA used {ratio:.2f}x the grid's trial-epochs (goal <= 0.33); best val accuracy "
          f"{gap:+.2f} pt behind the grid (goal <= 0.5) -> {'met' if out['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()

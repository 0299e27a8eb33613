"""P7 bench: ASHA sweeps vs the full grid over the same space, as users run them.

Both sweep one method on one offline task with the shipped backbone over the same grid, through
Ray Tune on a local cluster with the same concurrency: FIFO trains every point for all epochs, once
(seed 0); ASHA runs with ``--seeds`` training seeds and the rungs ``petl sweep`` derives from the
epoch budget (``training.spec.asha_rungs``: 1, 3 and 9 epochs at reduction factor 3 for 9 epochs).
Reports the trial-epochs each used and the best val accuracy each found, and the median, mean
and spread over the ASHA seeds. Goal: ASHA uses <= 1/3 of the grid's trial-epochs with its best within 0.5 pt
of the grid's best.

Resumable: each finished sweep is kept in ``<out-dir>/p7_runs.json`` under its settings, and a rerun
with the same settings skips it (the grid is the long one). Writes ``p7_asha_vs_grid.json``.

The default is the setting users run: ``petl sweep``'s default space for the method, as a 27-point
grid (dyn_linear: the lr, 9 log-spaced values across its log-uniform range, x p_m's 3 choices), and 9
epochs. ``--drop-rates`` is the grid measured first (p_shallow x p_deep x p_m): on dyn_linear only p_m
acts, so its 27 points were 3 settings, and ties let ASHA promote more trials than it would.
``--hyperband-seeds`` (default 1) also runs ``petl sweep --scheduler hyperband`` on the same grid.
``--quick`` (petl bench --quick) is a 12-point, 4-epoch smoke of the same code with one seed.

    nice .venv/bin/python bench/p7_asha_vs_grid.py [--method dyn_linear] [--epochs 9] [--seeds 3]
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
DROP_RATES = ["p_shallow=grid(0.1,0.4,0.7)", "p_deep=grid(0.0,0.15,0.3)", "p_m=grid(0.0,0.1,0.2)"]  # 27 points
QUICK_SPACE = ["p_shallow=grid(0.1,0.4,0.7)", "p_m=grid(0.0,0.1,0.2,0.3)"]  # 12 points


def default_grid(method: str, lr_points: int = 9, uniform_points: int = 3) -> list[str]:
    """``petl sweep``'s default space for ``method`` as a grid: a log-uniform range -> ``lr_points``
    log-spaced values (ends included), a uniform one -> ``uniform_points`` evenly spaced, a choice ->
    its values."""
    from petl_platform.training.space import default_space, parse_space

    out = []
    for key, (dist, args) in parse_space(default_space(method), method).items():
        if dist == "loguniform":
            lo, hi = args
            vals = [float(f"{lo * (hi / lo) ** (i / (lr_points - 1)):.3g}") for i in range(lr_points)]
        elif dist == "uniform":
            lo, hi = args
            vals = [round(lo + (hi - lo) * i / (uniform_points - 1), 4) for i in range(uniform_points)]
        elif dist in ("choice", "grid"):
            vals = args
        else:
            raise SystemExit(f"p7: no grid for {key}={dist}{tuple(args)}")
        out.append(f"{key}=grid({','.join(repr(v) for v in vals)})")
    return out


def _summary(s: dict, wall_s: float) -> dict:
    return {"trial_epochs": s["trial_epochs"], "best_val_accuracy": s["best"]["val_accuracy"],
            "best_params": s["best"]["params"], "wall_s": round(wall_s, 1),
            "trials_stopped_early": sum(t["stopped_early"] for t in s["trials"])}


def _spread(values: list) -> dict:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits-1k")
    ap.add_argument("--method", default="dyn_linear", help="any method: the grid is its default space's")
    ap.add_argument("--drop-rates", action="store_true", help="the first grid: p_shallow x p_deep x p_m (Dyn-* only)")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--seeds", type=int, default=3, help="ASHA runs, with training seeds 0..N-1 (the grid runs once)")
    ap.add_argument("--hyperband-seeds", type=int, default=1, help="Hyperband runs too (petl sweep --scheduler "
                    "hyperband), with training seeds 0..N-1; 0 for none")
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a 12-point grid (p_shallow x p_m), dyn_linear, one "
                    "ASHA seed (petl bench --quick also passes --epochs 4)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON goes (and p7_runs.json, to resume)")
    args = ap.parse_args()
    if args.quick:
        args.method, args.seeds, args.hyperband_seeds = "dyn_linear", 1, 0
    space = QUICK_SPACE if args.quick else DROP_RATES if args.drop_rates else default_grid(args.method)
    points = 1
    for item in space:
        points *= item.count(",") + 1
    os.environ.setdefault("PETL_HOME", tempfile.mkdtemp(prefix="petl-p7-"))
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    import ray

    from petl_platform.backbones.factory import SHIPPED
    from petl_platform.cluster.connect import ensure_ray
    from petl_platform.cluster.tune import run_sweep
    from petl_platform.tracking.settings import TrackingSettings
    from petl_platform.training.spec import SweepSpec, asha_rungs

    settings = TrackingSettings.from_env()
    grace, rf, rungs = asha_rungs(args.epochs)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_file = out_dir / "p7_runs.json"
    done = json.loads(runs_file.read_text()) if runs_file.exists() else {}

    def sweep(sched: str, seed: int) -> dict:
        key = json.dumps([args.task, args.method, space, args.epochs, args.concurrent, sched, seed,
                          [grace, rf] if sched == "asha" else [rf] if sched == "hyperband" else None]
                         # since 2026-12-05 a stopping scheduler gets the grid in a seeded order
                         # (cluster.tune.to_tune); the sorted-order runs before stay under their keys
                         + ([] if sched == "fifo" else ["grid order from the seed"]))
        if key in done:
            print(f"{sched:9} seed {seed}: kept from {runs_file}", flush=True)
            return done[key]
        t0 = time.time()
        # Hyperband takes no trial limit (training.spec): the same concurrency through each trial's CPUs
        limit = ({"cpus_per_trial": ray.cluster_resources()["CPU"] / args.concurrent} if sched == "hyperband"
                 else {"max_concurrent": args.concurrent})
        [s] = run_sweep(SweepSpec(tasks=(args.task,), method=args.method, backbone=SHIPPED, settings=settings,
                                  space=space, samples=1, epochs=args.epochs, train={"seed": seed},
                                  scheduler=sched, **limit,
                                  name=f"p7-{sched}-{seed}-{int(t0)}", register=False, progress=False))
        if len(s["trials"]) < points or any(t["error"] for t in s["trials"]):  # interrupted (Tune returns on ^C)
            raise SystemExit(f"{sched} seed {seed}: {len(s['trials'])} of {points} trials, errors "
                             f"{[t['error'] for t in s['trials'] if t['error']]}: not kept")
        done[key] = row = _summary(s, time.time() - t0)
        runs_file.write_text(json.dumps(done, indent=2) + "\n")
        print(f"{sched:9} seed {seed}: {row['trial_epochs']:3d} trial-epochs, best val acc "
              f"{row['best_val_accuracy']:.4f} {row['best_params']}, {row['wall_s']:.0f}s", flush=True)
        return row

    # ASHA on the grid in its written (ascending) order, run before the seeded order: kept for the report
    in_order = [done[k] for seed in range(args.seeds)
                if (k := json.dumps([args.task, args.method, space, args.epochs, args.concurrent, "asha", seed,
                                     [grace, rf]])) in done]

    ensure_ray()
    try:
        grid = sweep("fifo", 0)
        rounds = []
        for seed in range(args.seeds):
            asha = sweep("asha", seed)
            rounds.append({"seed": seed, "asha": asha,
                           "compute_ratio": asha["trial_epochs"] / grid["trial_epochs"],
                           "best_gap_pt": 100 * (grid["best_val_accuracy"] - asha["best_val_accuracy"])})
        hyperband = []
        for seed in range(args.hyperband_seeds):
            hb = sweep("hyperband", seed)
            hyperband.append({"seed": seed, "hyperband": hb, "compute_ratio": hb["trial_epochs"] / grid["trial_epochs"],
                              "best_gap_pt": 100 * (grid["best_val_accuracy"] - hb["best_val_accuracy"])})
    finally:
        ray.shutdown()
    ratio = _spread([r["compute_ratio"] for r in rounds])
    gap = _spread([r["best_gap_pt"] for r in rounds])
    out = {"task": args.task, "method": args.method, "space": space, "epochs": args.epochs, "grid_points": points,
           "reduction_factor": rf, "grace_period": grace, "rungs": rungs, "concurrency": args.concurrent,
           "grid": grid, "rounds": rounds, "compute_ratio": ratio, "best_gap_pt": gap,
           **({"asha_grid_in_order": [{**r, "compute_ratio": r["trial_epochs"] / grid["trial_epochs"],
                                       "best_gap_pt": 100 * (grid["best_val_accuracy"] - r["best_val_accuracy"])}
                                      for r in in_order]} if in_order else {}),
           **({"hyperband": {"rounds": hyperband,
                             "compute_ratio": _spread([r["compute_ratio"] for r in hyperband]),
                             "best_gap_pt": _spread([r["best_gap_pt"] for r in hyperband])}} if hyperband else {}),
           "goal": "compute <= 1/3 of the grid, best within 0.5 pt (median over ASHA seeds; the mean is reported too)",
           "met": ratio["median"] <= 1 / 3 and gap["median"] <= 0.5}
    (out_dir / "p7_asha_vs_grid.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nP7 (rungs at {rungs}, {len(rounds)} ASHA seeds): ASHA used {ratio['median']:.2f}x (mean {ratio['mean']:.2f}) "
          f"[{ratio['min']:.2f}-{ratio['max']:.2f}] the grid's trial-epochs (goal <= 0.33); best val accuracy "
          f"{gap['median']:+.2f} pt (mean {gap['mean']:+.2f}) [{gap['min']:+.2f} to {gap['max']:+.2f}] behind the grid (goal <= 0.5) -> "
          f"{'met' if out['met'] else 'NOT met'}")
    for r in hyperband:
        print(f"Hyperband seed {r['seed']}: {r['compute_ratio']:.2f}x the grid's trial-epochs, best val accuracy "
              f"{r['best_gap_pt']:+.2f} pt behind the grid")


if __name__ == "__main__":
    main()

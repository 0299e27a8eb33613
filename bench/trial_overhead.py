"""Where a sweep's and a `petl train`'s time goes (issue 23, goals T1 and T2), side by side in one
run on one task and method:

- **the plain loop** (`petl train --local`): ``run_finetune`` in this process, its wall and its
  epochs (``epoch_s``: train steps + val, the loop's own);
- **T2**: `petl train` through Ray (``run_train``: one worker, so a job on a trainer,
  ``cluster.trainer``) on a running local cluster, against the plain loop's wall for the same job
  (goal <= 1.5x). The first round's job starts the trainer, the later rounds' jobs reuse it, unless
  a sweep ran between them (a sweep ends idle trainers: run ``--trials 0`` for T2 alone). With
  ``--compare-train`` also the same job through a one-worker Ray Train ``TorchTrainer``;
- **T1**: a `petl sweep` (FIFO, one trial at a time with every CPU, so each trial has the plain
  loop's CPU share): its wall per trial-epoch against the plain loop's epoch (goal <= 2x), and
  where each trial's time went (``cluster.tune.trial_timing``: setup, the loop's epochs,
  measurements, the adapter checkpoint, MLflow logging, and the rest: Tune, the actor, the
  driver).

The cluster is started once, before anything is timed ("a running cluster"), with warm workers
(``--cold``: without); each timed job starts once the idle workers are at rest (``bench/warm.py``),
and ``per_round`` says which rounds' trials found a warm worker. Rounds alternate the three jobs;
each figure is the median over rounds.

    .venv/bin/python bench/trial_overhead.py [--quick] [--task digits-1k] [--method lora] [--epochs 3]
                                             [--trials 4] [--rounds 2] [--compare-reuse] [--compare-train]
                                             [--cold] [--out-dir DIR] [--out-name trial_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from petl_platform.backbones import SHIPPED
from petl_platform.cluster.connect import ray_session
from warm import wait_for_idle_workers
from petl_platform.cluster.train import run_train
from petl_platform.cluster import train as train_mod
from petl_platform.cluster import tune as tune_mod
from petl_platform.cluster.tune import run_sweep
from petl_platform.tracking.settings import TrackingSettings
from petl_platform.training.run import finetune
from petl_platform.training.spec import SweepSpec, TrainSpec

PARTS = ("setup_s", "epoch_s", "measure_s", "save_s", "log_s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 trials x 2 epochs, 1 round")
    ap.add_argument("--task", default="digits-1k")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=4, help="the T1 sweep's trials (0: no sweep, T2 only)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compare-reuse", action="store_true",
                    help="also run each sweep with a fresh actor per trial (Tune's default; the code before issue 23)")
    ap.add_argument("--compare-train", action="store_true",
                    help="T2 also through a one-worker Ray Train TorchTrainer (cluster.train.ONE_WORKER_TRAINER off)")
    ap.add_argument("--cold", action="store_true",
                    help="a cluster without warm workers (each trial's process imports torch, timm and Ray Tune)")
    ap.add_argument("--out-name", default="trial_overhead.json",
                    help="the JSON's name (the report reads trial_overhead.json and trial_overhead_*.json)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    epochs, trials, rounds = (2, 2, 1) if args.quick else (args.epochs, args.trials, args.rounds)
    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = {"epochs": epochs, "progress": False}

    local, ray_train, torch_trainer, sweeps, fresh = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="petl-bench-overhead-") as tmp:
        root = Path(tmp)
        settings = TrackingSettings(f"sqlite:///{root / 'm.db'}", str(root / "art"), str(root / "ray")).prepare()
        with ray_session(num_cpus=cpus, log_to_driver=False, warm=not args.cold):
            for r in range(rounds):
                wait_for_idle_workers(0 if r else cpus)  # before each timed job: no worker is starting beside it
                t0 = time.perf_counter()
                _, res = finetune(args.task, args.method, SHIPPED, train_overrides=train)
                local.append({"wall_s": time.perf_counter() - t0,
                              "epoch_s": [h["epoch_s"] for h in res["history"]] if "history" in res else []})
                wait_for_idle_workers()
                t0 = time.perf_counter()
                got = run_train(TrainSpec(settings=settings, task=args.task, method=args.method, train=train,
                                          cpus_per_worker=cpus, name=f"t2-{r}"), progress=lambda line: None)
                ray_train.append({"wall_s": time.perf_counter() - t0, "val_accuracy": got.get("val_accuracy")})
                if args.compare_train:
                    train_mod.ONE_WORKER_TRAINER = False
                    try:
                        wait_for_idle_workers()
                        t0 = time.perf_counter()
                        got = run_train(TrainSpec(settings=settings, task=args.task, method=args.method, train=train,
                                                  cpus_per_worker=cpus, name=f"t2-tt-{r}"), progress=lambda line: None)
                        torch_trainer.append({"wall_s": time.perf_counter() - t0,
                                              "val_accuracy": got.get("val_accuracy")})
                    finally:
                        train_mod.ONE_WORKER_TRAINER = True
                for reuse in ((True, False) if args.compare_reuse else (True,)) if trials else ():
                    tune_mod.REUSE_ACTORS = reuse
                    wait_for_idle_workers()
                    t0 = time.perf_counter()
                    summary = run_sweep(SweepSpec(settings=settings, method=args.method, tasks=(args.task,),
                                                  samples=trials, epochs=epochs, scheduler="fifo", max_concurrent=1,
                                                  cpus_per_trial=cpus, register=False, progress=False,
                                                  name=f"t1-{r}-{'reuse' if reuse else 'fresh'}"))[0]
                    wall = time.perf_counter() - t0
                    (sweeps if reuse else fresh).append({"wall_s": wall, "trial_epochs": summary["trial_epochs"],
                                                         "timing": [t["timing"] for t in summary["trials"]]})
                    print(f"round {r + 1}/{rounds}: sweep ({'actors reused' if reuse else 'an actor per trial'}) "
                          f"{wall:.1f} s for {summary['trial_epochs']} trial-epochs", flush=True)
                tune_mod.REUSE_ACTORS = True
                print(f"round {r + 1}/{rounds}: local {local[-1]['wall_s']:.1f} s, petl train on Ray "
                      f"{ray_train[-1]['wall_s']:.1f} s"
                      + (f", through a TorchTrainer {torch_trainer[-1]['wall_s']:.1f} s" if torch_trainer else ""),
                      flush=True)

    med = statistics.median
    epoch = med(e for run in local for e in run["epoch_s"])
    local_wall = med(run["wall_s"] for run in local)

    def t2_of(runs: list[dict]) -> dict:
        """T2 of one way to run ``petl train``: its median wall and its ratios to the plain loop's."""
        ratios = [rt["wall_s"] / lo["wall_s"] for rt, lo in zip(runs, local)]
        return {"ray_train_wall_s": round(med(r["wall_s"] for r in runs), 2), "ratio": round(med(ratios), 3),
                "range": [round(min(ratios), 3), round(max(ratios), 3)], "per_round": [round(x, 3) for x in ratios]}

    def breakdown(runs: list[dict]) -> dict:
        """One sweep's seconds per trial-epoch, split: each part summed over its trials, over its
        trial-epochs; the rest (Tune, the trial's actor, the driver) is the wall minus the parts."""
        parts = {}
        for s in runs:
            te = s["trial_epochs"]
            for k in PARTS:
                parts.setdefault(k, []).append(sum(t.get(k, 0.0) for t in s["timing"]) / te)
            inside = sum(sum(t.get(k, 0.0) for k in PARTS) for t in s["timing"])
            parts.setdefault("tune_actor_driver_s", []).append((s["wall_s"] - inside) / te)
        return {k: round(med(v), 3) for k, v in parts.items()}

    def t1_of(runs: list[dict]) -> dict:
        per = [s["wall_s"] / s["trial_epochs"] for s in runs]
        ratios = [p / epoch for p in per]
        return {"sweep_wall_s": round(med(s["wall_s"] for s in runs), 2), "per_trial_epoch_s": round(med(per), 3),
                "ratio": round(med(ratios), 3), "range": [round(min(ratios), 3), round(max(ratios), 3)],
                "goal": 2.0, "met": med(ratios) <= 2.0, "breakdown_s_per_trial_epoch": breakdown(runs)}
    result = {"task": args.task, "method": args.method, "epochs": epochs, "trials": trials, "rounds": rounds,
              "cpus": cpus, "warm_workers": not args.cold, "backbone": SHIPPED, "quick": args.quick,
              "plain_epoch_s": round(epoch, 3), "plain_wall_s": round(local_wall, 2),
              "T2": {**(t2 := t2_of(ray_train)), "goal": 1.5, "met": t2["ratio"] <= 1.5, "runs_as": "a trainer, reused"},
              **({"T2_torch_trainer": t2_of(torch_trainer)} if torch_trainer else {}),
              **({"T1": t1_of(sweeps)} if sweeps else {}), **({"T1_fresh_actors": t1_of(fresh)} if fresh else {}),
              "raw": {"local": local, "ray_train": ray_train, "torch_trainer": torch_trainer, "sweeps": sweeps,
                      "sweeps_fresh_actors": fresh}}
    (out_dir / args.out_name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`petl train` as a user types it on one machine, end to end, each command in a process of its
own: ``--local`` (the plain loop) against the default path, a local Ray cluster started by the
command for its job (on a trainer, ``cluster.trainer``, which ends with that cluster). Rounds
interleave the two; each figure is the median over rounds, and each ratio is against the same
round's ``--local`` wall. Issue 23's T2 asks for a running cluster (``trial_overhead.py``); this is
the cluster-per-command case, cluster start-up included. (An earlier version also ran the default
path with and without warm workers; with trainers, warm workers made the command slower, so a
one-worker ``petl train`` no longer starts them: ``cli_train_trainer_warm_vs_cold.json``.)

    .venv/bin/python bench/cli_train.py [--task digits-1k] [--method linear] [--epochs 2] [--rounds 3] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = {"local": ["--local"], "ray": []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits-1k")
    ap.add_argument("--method", default="linear")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    walls: dict[str, list[float]] = {k: [] for k in WAYS}
    with tempfile.TemporaryDirectory(prefix="petl-bench-cli-") as home:
        for r in range(args.rounds):
            for way, flags in WAYS.items():
                cmd = [sys.executable, "-m", "petl_platform.cli", "train", "--task", args.task, "--method", args.method,
                       "--epochs", str(args.epochs), "--json", *flags]
                t0 = time.perf_counter()
                p = subprocess.run(cmd, env={**os.environ, "PETL_HOME": home}, capture_output=True, text=True)
                walls[way].append(time.perf_counter() - t0)
                if p.returncode:
                    print(p.stderr[-2000:], file=sys.stderr)
                    return p.returncode
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
    med = statistics.median
    result = {"task": args.task, "method": args.method, "epochs": args.epochs, "rounds": args.rounds,
              "cpus": os.cpu_count(), "wall_s": {k: round(med(v), 2) for k, v in walls.items()},
              "walls_s": {k: [round(x, 2) for x in v] for k, v in walls.items()}}
    ratios = [w / lo for w, lo in zip(walls["ray"], walls["local"])]
    result["ray"] = {"ratio": round(med(ratios), 3), "range": [round(min(ratios), 3), round(max(ratios), 3)]}
    (out_dir / "cli_train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

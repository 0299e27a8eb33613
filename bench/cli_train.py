"""`petl train` as a user types it on one machine, end to end, each command in a process of its
own: ``--local`` (the plain loop) against the default path, a local Ray cluster started by the
command for its job (on a trainer, ``cluster.trainer``, which this cluster's end also ends), with
warm workers (``cluster.connect.ensure_ray(warm=True)``: the idle workers Ray starts with the
cluster import the platform while the driver sets up, and the trainer starts on one) and without them (``PETL_WARM_WORKERS=0``, how it ran before). Rounds
interleave the three; each figure is the median over rounds, and each ratio is against the same
round's ``--local`` wall. Issue 23's T2 asks for a running cluster (``trial_overhead.py``); this
is the cluster-per-command case, cluster start-up included.

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

WAYS = {"local": (["--local"], {}), "cold": ([], {"PETL_WARM_WORKERS": "0"}), "warm": ([], {"PETL_WARM_WORKERS": "1"})}


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
            for way, (flags, env) in WAYS.items():
                cmd = [sys.executable, "-m", "petl_platform.cli", "train", "--task", args.task, "--method", args.method,
                       "--epochs", str(args.epochs), "--json", *flags]
                t0 = time.perf_counter()
                p = subprocess.run(cmd, env={**os.environ, "PETL_HOME": home, **env}, capture_output=True, text=True)
                walls[way].append(time.perf_counter() - t0)
                if p.returncode:
                    print(p.stderr[-2000:], file=sys.stderr)
                    return p.returncode
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
    med = statistics.median
    result = {"task": args.task, "method": args.method, "epochs": args.epochs, "rounds": args.rounds,
              "cpus": os.cpu_count(), "wall_s": {k: round(med(v), 2) for k, v in walls.items()},
              "walls_s": {k: [round(x, 2) for x in v] for k, v in walls.items()}}
    for way in ("cold", "warm"):
        ratios = [w / lo for w, lo in zip(walls[way], walls["local"])]
        result[way] = {"ratio": round(med(ratios), 3), "range": [round(min(ratios), 3), round(max(ratios), 3)]}
    (out_dir / "cli_train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

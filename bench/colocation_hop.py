"""Why TrunkBackbone co-locates the shared-trunk tasks' tails: the hop it avoids, measured.

Side by side on the shipped backbone, batch 32, for N trunk-sharing tasks (linear probes and
DTL tails): (a) co-located: trunk + every task's tail in one process (what TrunkBackbone does);
(b) with a hop: the trunk here, the trunk states sent to a separate Ray actor (another replica)
that runs the tails and returns the logits. Reports the bytes shipped per batch and both
latencies (median of repeats). Writes bench/results/colocation_hop.json.

    nice .venv/bin/python bench/colocation_hop.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _models(bb, n_linear: int, n_dtl: int):
    from petl_platform import build_model

    torch.manual_seed(0)
    models = {f"linear-{i}": build_model("linear", bb, 10) for i in range(n_linear)}
    models.update({f"dtl-{i}": build_model("dtl", bb, 10, m=7) for i in range(n_dtl)})
    return {k: m.eval() for k, m in models.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON goes")
    args = ap.parse_args()
    import ray

    from petl_platform import create_backbone
    from petl_platform.backbones.factory import SHIPPED
    from petl_platform.methods.base import run_trunk

    torch.set_num_threads(1)
    bb = create_backbone(SHIPPED)
    models = _models(bb, 4, 4)
    depth = max(m.shared_prefix_blocks for m in models.values())
    x = torch.randn(32, 3, 32, 32)

    def tails(states):
        with torch.inference_mode():
            return {k: m.forward_tail(states[:m.shared_prefix_blocks + 1]) for k, m in models.items()}

    @ray.remote(num_cpus=1)
    class Tails:  # the "other replica": holds the task tails, receives the trunk states
        def __init__(self, models):
            torch.set_num_threads(1)
            self.models = models

        def run(self, states):
            with torch.inference_mode():
                return {k: m.forward_tail(states[:m.shared_prefix_blocks + 1]) for k, m in self.models.items()}

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        actor = Tails.remote(models)
        with torch.inference_mode():
            states = run_trunk(bb, x, depth)
        ray.get(actor.run.remote(states))  # warm-up
        shipped = sum(s.numel() * s.element_size() for s in states)
        local, hop = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                st = run_trunk(bb, x, depth)
            a = tails(st)
            local.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.inference_mode():
                st = run_trunk(bb, x, depth)
            b = ray.get(actor.run.remote(st))
            hop.append(time.perf_counter() - t0)
            assert all(torch.allclose(a[k], b[k]) for k in a)
    finally:
        ray.shutdown()
    out = {"batch": 32, "tasks": len(models), "trunk_blocks": depth, "states_shipped_mb": shipped / 2**20,
           "colocated_ms": 1e3 * statistics.median(local), "with_hop_ms": 1e3 * statistics.median(hop),
           "repeats": args.repeats, "ratio_range": [min(h / lo for h, lo in zip(hop, local)), max(h / lo for h, lo in zip(hop, local))]}
    out["hop_overhead"] = out["with_hop_ms"] / out["colocated_ms"]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "colocation_hop.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"batch 32, {len(models)} trunk tasks: {out['states_shipped_mb']:.1f} MB of trunk states per batch; "
          f"co-located {out['colocated_ms']:.1f} ms vs with a hop {out['with_hop_ms']:.1f} ms "
          f"({out['hop_overhead']:.2f}x)")


if __name__ == "__main__":
    main()

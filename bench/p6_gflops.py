"""P6: achieved GFLOP/s of the served backbone vs the matmul peak measured in the same run.

The peak: a square fp32 matmul (``--n``) timed on this machine; FLOPs = 2 n^3. The backbone: the
forward the TrunkBackbone deployment runs for a full-depth task (the frozen trunk + a head) at the
Serve YAML's batch sizes, FLOPs measured by ``FlopCounterMode`` over the ops that ran (multiply-adds
x 2). Peak and backbone timings are interleaved round by round so background load hits both alike;
each figure is the median of the rounds with the min-max spread. Through HTTP, the report multiplies
the serving bench's saturation throughput by the measured GFLOPs per image.

    nice .venv/bin/python bench/p6_gflops.py [--quick] [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def _best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(n: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _best_of(lambda: a @ b, 3) / 1e9


@torch.inference_mode()
def model_gflops(model, x: torch.Tensor, flops: float) -> float:
    return flops / _best_of(lambda: model(x), 2) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 7, no ViT-B/16")
    ap.add_argument("--n", type=int, default=2048, help="matmul size")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="32 = the YAML's max_batch_size")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    from petl_platform import build_model, create_backbone
    from petl_platform.backbones.factory import SHIPPED

    rounds = 3 if args.quick else 7
    backbones = [SHIPPED] + ([] if args.quick else ["vit_base_patch16_224"])
    matmul_gflops(args.n)  # warm-up (thread pool, allocator)
    out = {"benchmark": "p6_gflops", "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "matmul_n": args.n, "rounds": rounds, "backbones": {}}
    peaks = []
    for name in backbones:
        torch.manual_seed(0)
        bb = create_backbone(name)
        model = build_model("linear", bb, 10).eval()
        size = bb.patch_embed.img_size
        res = {}
        for b in args.batches:
            x = torch.randn(b, 3, *size)
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                model(x)
            flops = counter.get_total_flops()
            model_gflops(model, x, flops)  # warm-up at this batch size
            achieved, peak = [], []
            for _ in range(rounds):
                peak.append(matmul_gflops(args.n))
                achieved.append(model_gflops(model, x, flops))
            peaks += peak
            fracs = [a / p for a, p in zip(achieved, peak)]
            res[str(b)] = {"batch": b, "gflops_per_image": flops / b / 1e9, "achieved_gflops_s": statistics.median(achieved),
                           "achieved_range": [min(achieved), max(achieved)], "peak_gflops_s": statistics.median(peak),
                           "fraction_of_peak": statistics.median(fracs), "fraction_range": [min(fracs), max(fracs)]}
            r = res[str(b)]
            print(f"{name} batch {b:>2}: {r['achieved_gflops_s']:.1f} GFLOP/s achieved vs matmul peak "
                  f"{r['peak_gflops_s']:.1f} -> {100 * r['fraction_of_peak']:.0f} % of peak "
                  f"(rounds {100 * r['fraction_range'][0]:.0f}-{100 * r['fraction_range'][1]:.0f} %)", flush=True)
        out["backbones"][name] = res
    out["peak_gflops_s"] = statistics.median(peaks)
    out["peak_range"] = [min(peaks), max(peaks)]
    dest = Path(args.out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "p6_gflops.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest / 'p6_gflops.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

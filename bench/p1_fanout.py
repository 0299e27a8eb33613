"""P1: one image batch, 19 DTL tasks (M = 7) on ViT-B/16: shared trunk vs 19 independent forwards.

The paper (DTL, "feature reuse"): 19 VTAB tasks on one image with the first blocks shared saves
about 45 % latency. Here: random-weight ViT-B/16 (timing only), 19 DTL models with non-zero CSN
weights, eval mode, ``torch.inference_mode``. ``MultiTaskPredictor.predict`` (trunk once, then 19
tails) against ``model(x)`` for each of the 19 models, interleaved repeat by repeat so that
background load hits both sides alike; median and spread of wall time, goal >= 1.7x.

    nice .venv/bin/python bench/p1_fanout.py [--quick] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from petl_platform import build_model, create_backbone  # noqa: E402
from petl_platform.inference import MultiTaskPredictor  # noqa: E402

N_TASKS, M, GOAL = 19, 7, 1.7


def _models(backbone):
    models = {}
    for t in range(N_TASKS):
        torch.manual_seed(100 + t)
        model = build_model("dtl", backbone, 10 + t, m=M)
        with torch.no_grad():
            for blk in model.vit.blocks:
                blk.dtl_csn.c.normal_(0, 0.02)  # a trained-looking CSN, not the zero init
        models[f"task{t:02d}"] = model.eval()
    return models


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _summary(xs: list[float]) -> dict:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "runs_s": xs}


def bench_batch(pred: MultiTaskPredictor, models: dict, batch: int, repeats: int) -> dict:
    torch.manual_seed(batch)
    x = torch.randn(batch, 3, 224, 224)
    tasks = list(models)

    def shared():
        last.update(pred.predict(x, tasks))

    def independent():
        with torch.inference_mode():
            for model in models.values():
                model(x)

    with torch.inference_mode():  # warmup at this batch size; also the "alone" reference of task 0
        alone = models[tasks[0]](x)
    last = {}
    ts, ti = [], []
    for r in range(repeats):  # interleaved, alternating order
        if r % 2 == 0:
            ts.append(_timed(shared))
            ti.append(_timed(independent))
        else:
            ti.append(_timed(independent))
            ts.append(_timed(shared))
        print(f"  batch {batch} repeat {r + 1}/{repeats}: shared {ts[-1]:.2f}s  independent {ti[-1]:.2f}s", flush=True)
    st = pred.last_stats
    max_diff = (last[tasks[0]] - alone).abs().max().item()  # shared output == independent output
    ratios = [i / s for i, s in zip(ti, ts)]
    return {"batch": batch, "repeats": repeats, "shared": _summary(ts), "independent": _summary(ti),
            "speedup_median": statistics.median(ti) / statistics.median(ts),
            "speedup_per_repeat": ratios, "speedup_min": min(ratios), "speedup_max": max(ratios),
            "blocks_run_shared": st.blocks_run, "blocks_run_independent": st.blocks_independent,
            "block_ratio": st.block_ratio, "max_abs_diff_vs_alone": max_diff}


def _write(args, load0, results) -> None:
    report = {"benchmark": "p1_fanout", "backbone": "vit_base_patch16_224 (random weights)", "tasks": N_TASKS,
              "method": "dtl", "m": M, "goal_speedup": GOAL, "device": "cpu", "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "loadavg_start": load0, "loadavg_end": os.getloadavg(), "quick": args.quick, "results": results,
              "goal_met": all(r["speedup_median"] >= GOAL for r in results)}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "p1_fanout.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats (full: 7 at batch 1, 3 at batch 16)")
    ap.add_argument("--repeats", type=int, default=0, help="override the repeats of every batch size")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 16 (--quick: 1)")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    args.batches = args.batches or ([1] if args.quick else [1, 16])
    repeats = {1: 3 if args.quick else 7}
    torch.manual_seed(0)
    backbone = create_backbone("vit_base_patch16_224")
    models = _models(backbone)
    pred = MultiTaskPredictor(backbone, models)
    load0 = os.getloadavg()
    results = []
    for b in args.batches:
        n = args.repeats or repeats.get(b, 1 if args.quick else 3)
        results.append(bench_batch(pred, models, b, n))
        r = results[-1]
        print(f"batch {b:>3}: shared {r['shared']['median_s']:.3f}s  independent {r['independent']['median_s']:.3f}s  "
              f"speedup {r['speedup_median']:.2f}x (per-repeat {r['speedup_min']:.2f}-{r['speedup_max']:.2f}; "
              f"block ratio {r['block_ratio']:.2f}; goal >= {GOAL}x)", flush=True)
        _write(args, load0, results)  # after every batch size, so a cut-short run keeps its figures
    print(f"wrote {Path(args.out_dir) / 'p1_fanout.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

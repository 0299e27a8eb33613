"""P5, the hard case: one batch of 64 rows spread over N distinct tasks of a method that touches
every block (LoRA, Adapter, ARC, Dyn-LoRA), through the mixed-task engine, against ONE task at
batch 64 in its deployed form (merged weights for the mergeable methods; Dyn-LoRA merged, at full
depth). Goal: >= 0.85x at N = 64 on CPU (LoRA servers for LLMs lose 20-50 % here).

In-process, on the shipped backbone, fp32, eval mode, ``torch.inference_mode``: every task a model
with its own random (non-zero) adapter and head; rows assigned round-robin so every task has rows.
Dyn-LoRA runs with its thresholds out of reach (full depth) on both sides, so the ratio measures
batching, not exits. Mixed and single-task runs are interleaved round by round, so background load
hits both alike; the figure is the median ratio over rounds. The same through HTTP is in
``serve_load.py`` (``p5_http``).

    .venv/bin/python bench/p5_mixed_tasks.py [--quick] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from petl_platform import build_model, create_backbone, get_method
from petl_platform.backbones import SHIPPED
from petl_platform.inference import Engine, Row

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"lora": {}, "adapter": {}, "arc": {}, "dyn_lora": {}}
NS = (1, 4, 16, 64)
BATCH, GOAL = 64, 0.85


def make_tasks(method: str, backbone, n: int, hp: dict) -> dict:
    models = {}
    for i in range(n):
        torch.manual_seed(1000 + i)
        model = build_model(method, backbone, 10, **hp)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)  # a trained-looking adapter: every delta is non-zero
        models[f"{method}-{i}"] = model.eval()
    return models


def single_task(method: str, models: dict, x):
    """The baseline: the first task at batch ``len(x)`` in its deployed form (merged where the method
    merges), and the knobs every row runs with (Dyn-*: thresholds out of reach, so full depth)."""
    one = models[next(iter(models))]
    spec = get_method(method)
    single = one.merged().eval() if spec.mergeable else one
    knobs = {"thresholds": [2.0] * (len(one.exit_blocks()) - 1)} if spec.runtime == "early_exit" else {}
    return knobs, (lambda: single.predict_dynamic(x, knobs["thresholds"])) if knobs else (lambda: single(x))


def max_diff_vs_alone(engine, x, models: dict, tasks: dict, knobs: dict) -> float:
    """The largest |engine answer - task alone| over 8 rows of 8 tasks (``tasks``: what the engine runs)."""
    names = list(models)
    got = engine.run(x[:8], [Row(i, names[i], knobs) for i in range(8)], tasks)
    return max(float((r.logits - (models[names[i]].predict_dynamic(x[i:i + 1], knobs["thresholds"])["logits"][0]
                                  if knobs else models[names[i]](x[i:i + 1])[0])).abs().max()) for i, r in enumerate(got))


def timed(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 2 iterations (else 5 of 3)")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--backbone", default=SHIPPED)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    args = ap.parse_args()
    rounds, iters = (3, 2) if args.quick else (5, 3)
    bb = create_backbone(args.backbone)
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, *bb.patch_embed.img_size)
    engine = Engine(bb, merge_cache=0)  # the mixed path even at N = 1: the single-task side is merged
    results = {}
    for method in args.families:
        models = make_tasks(method, bb, max(NS), FAMILIES[method])
        names = list(models)
        knobs, single_fn = single_task(method, models, x)
        mixed_rows = {n: [Row(i, names[i % n], knobs) for i in range(BATCH)] for n in NS}
        with torch.inference_mode():
            # equality check first: the mixed answers are the tasks' own
            err = max_diff_vs_alone(engine, x, models, models, knobs)
            for fn in [single_fn] + [lambda n=n: engine.run(x, mixed_rows[n], models) for n in NS]:
                fn()  # warm-up: merged copies, mixed ViT, allocator
            per_round = []
            for _ in range(rounds):
                base = timed(single_fn, iters)
                per_round.append({"single_s": base, **{f"n{n}_s": timed(lambda n=n: engine.run(x, mixed_rows[n], models),
                                                                        iters) for n in NS}})
        res = {"max_abs_diff_vs_alone": err, "single_img_per_s": BATCH / statistics.median(r["single_s"] for r in per_round),
               "rounds": per_round, "by_n": {}}
        for n in NS:
            ratios = [r["single_s"] / r[f"n{n}_s"] for r in per_round]
            res["by_n"][str(n)] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                                   "ratio_max": max(ratios), "img_per_s": BATCH / statistics.median(r[f"n{n}_s"] for r in per_round)}
        results[method] = res
        print(f"{method:9} single {res['single_img_per_s']:.0f} img/s; " + "  ".join(
            f"N={n}: {res['by_n'][str(n)]['ratio_median']:.2f}x" for n in NS) + f"  (max diff {err:.1e})", flush=True)
    out = {"backbone": args.backbone, "batch": BATCH, "ns": list(NS), "goal": GOAL, "rounds": rounds, "iters": iters,
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "single": "merged weights (LoRA, ARC, Dyn-LoRA); Adapter unmerged (not mergeable)", "families": results}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "p5_mixed_tasks.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

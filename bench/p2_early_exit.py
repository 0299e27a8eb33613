"""P2 bench: Dyn-LoRA early exits vs the same model at full depth (CPU, measured side by side).

Trains ``dyn_<base>`` briefly on an offline task, calibrates the exit thresholds on val for a
FLOPs budget (default 50 %), then on test compares full depth (``model(x)``) with dynamic
inference (``predict_dynamic``, batch shrinking): accuracy, measured FLOPs and img/s at batch 1
and batch 64. Both paths run on the *merged* model (LoRA folded into the frozen weights, exits
kept), the paper's setting for LoRA / RepAdapter. Timings: ``--repeats`` interleaved rounds,
median and spread. Writes bench/results/p2_early_exit.json and the accuracy-vs-FLOPs PNG.

    nice .venv/bin/python bench/p2_early_exit.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from petl_platform import create_backbone
from petl_platform.backbones.factory import ASSETS, SHIPPED
from petl_platform.data import get_task, task_tensors
from petl_platform.methods import build_model, get_method
from petl_platform.methods.dyn_exit import accuracy_flops_curve, calibrate, save_curve_png
from petl_platform.methods.dyn_exit.calibrate import evaluate_dynamic
from petl_platform.training import train
from petl_platform.training.loop import TrainConfig

RESULTS = Path(__file__).parent / "results"


def backbone():
    if (ASSETS / f"{SHIPPED}.safetensors").exists():
        return create_backbone(SHIPPED), SHIPPED
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=12, embed_dim=128, num_heads=4)
    return bb, "random vit 12x128 (shipped backbone missing)"


@torch.no_grad()
def throughput(fn, x: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        fn(x[i:i + batch])
    return len(x) / (time.perf_counter() - t0)


def timed(model, thresholds, x: torch.Tensor, batch: int, repeats: int) -> dict:
    full_fn = model.__call__
    dyn_fn = lambda xb: model.predict_dynamic(xb, thresholds)  # noqa: E731
    throughput(full_fn, x[:batch * 2], batch), throughput(dyn_fn, x[:batch * 2], batch)  # warm-up
    full, dyn = [], []
    for _ in range(repeats):  # interleaved so background load hits both alike
        full.append(throughput(full_fn, x, batch))
        dyn.append(throughput(dyn_fn, x, batch))
    ratios = [d / f for d, f in zip(dyn, full)]
    return {"batch": batch, "images": len(x), "full_img_s": statistics.median(full), "dyn_img_s": statistics.median(dyn),
            "full_img_s_range": [min(full), max(full)], "dyn_img_s_range": [min(dyn), max(dyn)],
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dyn_lora")
    ap.add_argument("--task", default="digits-1k")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--b1-images", type=int, default=128, help="test images timed one by one")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the 2 shared cores are busy)")
    ap.add_argument("--quick", action="store_true", help="3 epochs, 3 repeats, 64 images at batch 1")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON (and PNGs) go")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.b1_images = 3, 3, 64
    out_dir = Path(args.out_dir)
    torch.set_num_threads(args.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    bb, bb_name = backbone()
    task = get_task(args.task)
    data = task_tensors(task, bb)
    torch.manual_seed(0)
    model = build_model(args.method, bb, len(task.classes))
    res = train(model, data, TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=64, progress=False, device="cpu"))
    print(f"{args.method} on {args.task} ({bb_name}): trained {res.wall_s:.0f}s, full-depth test acc {res.accuracy:.4f}")

    if get_method(args.method).mergeable:
        model = model.merged()  # LoRA folded into the trunk, exits kept
    model.eval()
    cal = calibrate(model, *data["val"], budget=args.budget)
    x_test, y_test = data["test"]
    full = evaluate_dynamic(model, x_test, y_test, [2.0] * (model.stages - 1))
    with torch.no_grad():
        full_acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    dyn = evaluate_dynamic(model, x_test, y_test)
    curve = accuracy_flops_curve(model, *data["val"], [0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0], x_test, y_test)
    png = save_curve_png(curve, out_dir / "p2_accuracy_vs_flops.png",
                         title=f"{args.method} on {args.task}: accuracy vs measured FLOPs")
    thr = model.exit_thresholds.tolist()
    b1 = timed(model, thr, x_test[:args.b1_images], 1, args.repeats)
    b64 = timed(model, thr, x_test, 64, args.repeats)

    out = {
        "method": args.method, "task": args.task, "backbone": bb_name, "epochs": args.epochs, "threads": args.threads,
        "merged": ":merged" in model.method, "budget": args.budget, "calibration": cal,
        "full_depth": {"test_accuracy": full_acc, "flops_per_image": model.flop_profile()["full"],
                       "with_all_exit_heads_flops_fraction": full["flops_fraction"]},
        "dynamic": {"test_accuracy": dyn["accuracy"], "flops_fraction": dyn["flops_fraction"],
                    "exit_fractions": dyn["exit_fractions"]},
        "accuracy_drop_pt": 100 * (full_acc - dyn["accuracy"]),
        "throughput_b1": b1, "throughput_b64": b64, "curve": curve, "curve_png": str(png),
        "goal": ">= 1.8x img/s at <= 0.5 pt accuracy loss", "quick": args.quick, "repeats": args.repeats, "wall_s": time.time() - t0,
    }
    out["goal_met"] = bool(min(b1["speedup"], b64["speedup"]) >= 1.8 and out["accuracy_drop_pt"] <= 0.5)
    (out_dir / "p2_early_exit.json").write_text(json.dumps(out, indent=2) + "\n")

    print(f"calibrated thresholds {[round(t, 4) for t in thr]} (val acc {cal['val_accuracy']:.4f}, "
          f"val FLOPs {cal['flops_fraction']:.3f})")
    print(f"test accuracy: full {full_acc:.4f}  dynamic {dyn['accuracy']:.4f}  (drop {out['accuracy_drop_pt']:+.2f} pt)")
    print(f"test measured FLOPs: dynamic/full = {dyn['flops_fraction']:.3f}; exits {[round(f, 3) for f in dyn['exit_fractions']]}")
    for r in (b1, b64):
        print(f"batch {r['batch']:>2}: full {r['full_img_s']:.1f} img/s, dynamic {r['dyn_img_s']:.1f} img/s -> "
              f"speedup {r['speedup']:.2f}x (range {r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f})")
    print(f"goal (>= 1.8x at <= 0.5 pt loss) met: {out['goal_met']}; wall {out['wall_s']:.0f}s; "
          f"wrote {out_dir / 'p2_early_exit.json'}, {png}")


if __name__ == "__main__":
    main()

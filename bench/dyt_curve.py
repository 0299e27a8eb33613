"""DyT accuracy vs measured FLOPs on one offline task, plus the activation rate per layer.

Trains ``dyt`` (r = 0.5 by default) briefly with the library's loop on the shipped backbone, then
sweeps the per-call token ``ratio`` knob (top-ratio tokens per image by dispatcher score) and
the trained 0.5 threshold on test: accuracy, measured activation rate and the FLOPs that actually
ran (from ``last_stats``). Writes bench/results/dyt_accuracy_vs_flops.png, dyt_activation_rate.png
and dyt_curve.json.

    nice .venv/bin/python bench/dyt_curve.py [--task digits-1k] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import torch

from petl_platform import SHIPPED, build_model, create_backbone
from petl_platform.data import get_task, task_tensors
from petl_platform.training import TrainConfig, seed_everything, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def measure(model, x, y, ratio=None, batch=256) -> dict:
    model.eval()
    correct, flops, dense, rates = 0, 0, 0, []
    for i in range(0, len(x), batch):
        logits, info = model.infer(x[i:i + batch], ratio=ratio)
        correct += (logits.argmax(-1) == y[i:i + batch]).sum().item()
        flops, dense = flops + info["flops"], dense + info["dense_flops"]
        rates.append(info["activation_rate_per_layer"])
    per_layer = torch.tensor(rates).mean(0).tolist()
    return {"ratio": ratio, "accuracy": correct / len(x), "flops_fraction": flops / dense,
            "activation_rate": sum(per_layer) / len(per_layer), "activation_rate_per_layer": per_layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits-1k")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target-rate", type=float, default=0.5)
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON (and PNGs) go")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    bb = create_backbone(SHIPPED)
    task = get_task(args.task)
    data = task_tensors(task, bb)
    seed_everything(0)
    model = build_model("dyt", bb, len(task.classes), target_rate=args.target_rate)
    res = train(model, data, TrainConfig(epochs=args.epochs, lr=args.lr, progress=False))
    x, y = data["test"]
    trained = measure(model, x, y)
    sweep = [measure(model, x, y, r) for r in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)]
    out = {"task": args.task, "backbone": SHIPPED, "epochs": args.epochs, "target_rate": args.target_rate,
           "train_test_accuracy": res.accuracy, "threshold_0.5": trained, "ratio_sweep": sweep}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dyt_curve.json").write_text(json.dumps(out, indent=2))
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([100 * p["flops_fraction"] for p in sweep], [100 * p["accuracy"] for p in sweep], "o-", label="ratio knob")
    ax.plot([100 * trained["flops_fraction"]], [100 * trained["accuracy"]], "r*", ms=12, label="trained threshold 0.5")
    ax.set_xlabel("measured FLOPs (% of dense adapter model)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"DyT on {args.task}: accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "dyt_accuracy_vs_flops.png")
    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.bar(range(1, len(trained["activation_rate_per_layer"]) + 1), trained["activation_rate_per_layer"])
    ax.axhline(args.target_rate, color="gray", ls="--", label=f"target r = {args.target_rate}")
    ax.set_xlabel("block")
    ax.set_ylabel("measured activation rate")
    ax.set_title(f"DyT token activation per layer ({args.task}, test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "dyt_activation_rate.png")
    print(f"DyT on {args.task}: test acc {trained['accuracy']:.3f} at threshold 0.5, measured activation "
          f"{trained['activation_rate']:.2f}, {trained['flops_fraction']:.0%} of dense FLOPs")
    for p in sweep:
        print(f"  ratio {p['ratio']:.1f}: acc {p['accuracy']:.3f}, FLOPs {p['flops_fraction']:.0%}")


if __name__ == "__main__":
    main()

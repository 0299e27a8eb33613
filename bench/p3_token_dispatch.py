"""P3: DyT token dispatch at r ~ 0.5 vs the dense adapter model (same adapters, no dispatch).

Both run the same DyT model: ``model(x)`` in eval mode is the real sparse inference (active
tokens gathered into one MLP call per block), ``model(x, mode="complete")`` is the dense adapter
model (every token through every MLP, no dispatcher). The dispatchers are calibrated so that
about half the patch tokens are active: layer by layer, each dispatcher's bias is set to minus
the median of its logits on a calibration batch (random weights, random images). The rate
reported is the one MEASURED on the timed batch (``model.last_stats()``), as are the FLOPs.

Timing: eval + inference_mode, warmup, then dense/DyT alternated ``repeats`` times; median img/s
and spread (min-max). Writes bench/results/p3_token_dispatch.json.

    nice .venv/bin/python bench/p3_token_dispatch.py [--repeats 3] [--batch 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from petl_platform import create_backbone
from petl_platform.methods import build_model

CONFIGS = {
    "vit_b16": ("vit_base_patch16_224", {}),
    "tiny12": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=12, embed_dim=128, num_heads=4)),
}
OUT = Path(__file__).parent / "results" / "p3_token_dispatch.json"


def calibrate(model, x: torch.Tensor, rate: float = 0.5) -> None:
    """Set each dispatcher's bias so that ``rate`` of its patch tokens are active on ``x``."""
    p = model.vit.num_prefix_tokens
    with torch.inference_mode():
        for blk in model.vit.blocks:
            for disp in blk.dispatcher:
                seen = []
                hook = disp.register_forward_hook(lambda m, i, o: seen.append(o))
                model(x, mode="masked")
                hook.remove()
                disp.proj.bias.sub_(torch.quantile(seen[0][:, p:].float().flatten(), 1.0 - rate))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_config(name: str, batch: int, repeats: int, warmup: int, device: torch.device) -> dict:
    arch, overrides = CONFIGS[name]
    torch.manual_seed(0)
    backbone = create_backbone(arch, **overrides).to(device)
    model = build_model("dyt", backbone, 10, bottleneck=8).to(device).eval()
    with torch.no_grad():
        for blk in model.vit.blocks:  # non-zero adapters (cost is the same either way)
            for a in blk.adapter:
                a.up.normal_(0, 0.02)
    size = backbone.patch_embed.img_size
    gen = torch.Generator().manual_seed(1)
    calibrate(model, torch.randn(8, 3, *size, generator=gen).to(device))
    x = torch.randn(batch, 3, *size, generator=gen).to(device)

    with torch.inference_mode():
        small = x[:4]
        err = (model(small) - model(small, mode="masked")).abs().max().item()
        for _ in range(warmup):
            model(x, mode="complete")
            model(x)
        dense_t, dyt_t = [], []
        for _ in range(repeats):  # alternate so background load hits both alike
            dense_t.append(timed(lambda: model(x, mode="complete"), device))
            dense_stats = model.last_stats()
            dyt_t.append(timed(lambda: model(x), device))
            stats = model.last_stats()

    def summary(ts):
        ips = [batch / t for t in ts]
        return {"img_per_s_median": statistics.median(ips), "img_per_s_min": min(ips), "img_per_s_max": max(ips),
                "seconds": ts}

    res = {"backbone": arch, "overrides": overrides, "batch": batch, "repeats": repeats, "warmup": warmup,
           "dense_adapter": summary(dense_t), "dyt": summary(dyt_t),
           "measured_activation_rate": stats["activation_rate"],
           "activation_rate_per_layer": stats["activation_rate_per_layer"],
           "dyt_gmacs": stats["flops"] / 1e9 / batch, "dense_gmacs": dense_stats["flops"] / 1e9 / batch,
           "flops_ratio": stats["flops"] / dense_stats["flops"], "sparse_vs_masked_max_abs_err": err}
    res["speedup_median"] = res["dyt"]["img_per_s_median"] / res["dense_adapter"]["img_per_s_median"]
    res["speedup_min"] = min(d / s for d, s in zip(dense_t, dyt_t))  # per alternated pair
    res["speedup_max"] = max(d / s for d, s in zip(dense_t, dyt_t))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny12,vit_b16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=0, help="0: 10 for tiny12, 3 for vit_b16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    device = torch.device(args.device)
    results = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "goal_speedup": 1.3, "configs": {}}
    for name in args.configs.split(","):
        repeats = args.repeats or (3 if name == "vit_b16" else 10)
        r = bench_config(name, args.batch, repeats, 1 if name == "vit_b16" else 2, device)
        results["configs"][name] = r
        print(f"{name:8s} batch {args.batch}: dense adapter {r['dense_adapter']['img_per_s_median']:.1f} img/s "
              f"[{r['dense_adapter']['img_per_s_min']:.1f}-{r['dense_adapter']['img_per_s_max']:.1f}], "
              f"DyT {r['dyt']['img_per_s_median']:.1f} img/s [{r['dyt']['img_per_s_min']:.1f}-{r['dyt']['img_per_s_max']:.1f}] "
              f"-> speedup {r['speedup_median']:.2f}x (pairs {r['speedup_min']:.2f}-{r['speedup_max']:.2f}); "
              f"measured rate {r['measured_activation_rate']:.3f}, GMACs/img {r['dyt_gmacs']:.3f} vs "
              f"{r['dense_gmacs']:.3f} ({r['flops_ratio']:.2f}); sparse-vs-masked err {r['sparse_vs_masked_max_abs_err']:.1e}",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

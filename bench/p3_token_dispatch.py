"""P3: DyT token dispatch at r ~ 0.5 vs the dense adapter model (same adapters, no dispatch).

Both run the same DyT model: ``model(x)`` in eval mode is the real sparse inference (active
tokens gathered into one MLP call per block), ``model(x, mode="complete")`` is the dense adapter
model (every token through every MLP, no dispatcher). The dispatchers are calibrated so that
about half the patch tokens are active: layer by layer, each dispatcher's bias is set to minus
the median of its logits on a calibration batch (random weights, random images). The rate
reported is the one MEASURED on the timed batch (``model.last_stats()``), as are the FLOPs.

Timing: eval + inference_mode, warmup (a smaller batch for ViT-B), then dense/DyT alternated
``repeats`` times; median img/s and spread (min-max), and the per-pair speedups.
Writes bench/results/p3_token_dispatch.json.

    nice .venv/bin/python bench/p3_token_dispatch.py [--configs tiny12@1,tiny12@2,vit_b16@1] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Set each dispatcher's bias so that ``rate`` of its patch tokens are active on ``x``: one
    masked forward in which every dispatcher, in turn, shifts its own logits (and bias) by their
    (1 - rate) quantile, so later layers see the already calibrated earlier ones."""
    p = model.vit.num_prefix_tokens

    def shift(disp, inputs, logits):
        q = torch.quantile(logits[:, p:].float().flatten(), 1.0 - rate)
        disp.proj.bias.sub_(q)
        return logits - q

    hooks = [d.register_forward_hook(shift) for blk in model.vit.blocks for d in blk.dispatcher]
    with torch.inference_mode():
        model(x, mode="masked")
    for h in hooks:
        h.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a loaded machine the CPU time is the
    steadier cross-check, the wall time the figure that counts."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_config(name: str, batch: int, repeats: int, warmup: int, warmup_batch: int, device: torch.device) -> dict:
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
            model(x[:warmup_batch], mode="complete")
            model(x[:warmup_batch])
        dense_t, dyt_t = [], []
        for _ in range(repeats):  # alternate so background load hits both alike
            dense_t.append(timed(lambda: model(x, mode="complete"), device))
            dense_stats = model.last_stats()
            dyt_t.append(timed(lambda: model(x), device))
            stats = model.last_stats()

    def summary(ts):
        ips = [batch / t for t, _ in ts]
        cpu = [batch / c for _, c in ts]
        return {"img_per_s_median": statistics.median(ips), "img_per_s_min": min(ips), "img_per_s_max": max(ips),
                "img_per_cpu_s_median": statistics.median(cpu), "wall_s": [t for t, _ in ts],
                "cpu_s": [c for _, c in ts]}

    res = {"backbone": arch, "overrides": overrides, "batch": batch, "repeats": repeats, "warmup": warmup,
           "warmup_batch": warmup_batch,
           "dense_adapter": summary(dense_t), "dyt": summary(dyt_t),
           "measured_activation_rate": stats["activation_rate"],
           "activation_rate_per_layer": stats["activation_rate_per_layer"],
           "dyt_gmacs": stats["flops"] / 1e9 / batch, "dense_gmacs": dense_stats["flops"] / 1e9 / batch,
           "flops_ratio": stats["flops"] / dense_stats["flops"], "sparse_vs_masked_max_abs_err": err}
    res["speedup_median"] = res["dyt"]["img_per_s_median"] / res["dense_adapter"]["img_per_s_median"]
    pairs = [d[0] / s[0] for d, s in zip(dense_t, dyt_t)]  # per alternated (dense, DyT) pair
    res["speedup_cpu_time_median"] = res["dyt"]["img_per_cpu_s_median"] / res["dense_adapter"]["img_per_cpu_s_median"]
    res.update(speedup_pairs_median=statistics.median(pairs), speedup_min=min(pairs), speedup_max=max(pairs))
    return res


def describe(key: str, r: dict) -> str:
    d, s = r["dense_adapter"], r["dyt"]
    return (f"{key:12s} batch {r['batch']}: dense adapter {d['img_per_s_median']:.1f} img/s "
            f"[{d['img_per_s_min']:.1f}-{d['img_per_s_max']:.1f}], DyT {s['img_per_s_median']:.1f} img/s "
            f"[{s['img_per_s_min']:.1f}-{s['img_per_s_max']:.1f}] -> speedup {r['speedup_median']:.2f}x "
            f"(per pair: median {r['speedup_pairs_median']:.2f}, {r['speedup_min']:.2f}-{r['speedup_max']:.2f}; "
            f"CPU time {r['speedup_cpu_time_median']:.2f}x); measured rate {r['measured_activation_rate']:.3f}; "
            f"GMACs/img {r['dyt_gmacs']:.3f} vs {r['dense_gmacs']:.3f} ({r['flops_ratio']:.2f}); "
            f"sparse-vs-masked max err {r['sparse_vs_masked_max_abs_err']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny12@1,tiny12@2,vit_b16@1",
                    help="comma list of NAME or NAME@THREADS (NAME in tiny12, vit_b16)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=0, help="0: 15 for tiny12, 2 for vit_b16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for a NAME without @THREADS "
                    "(1: on the shared 2-core box, 2 threads mostly measure contention with other jobs)")
    ap.add_argument("--out-dir", default=str(OUT.parent))
    ap.add_argument("--quick", action="store_true", help="no ViT-B/16 config, 9 repeats")
    args = ap.parse_args()
    if args.quick:
        args.configs, args.repeats = "tiny12@1,tiny12@2", args.repeats or 9
    device = torch.device(args.device)
    results = {"device": str(device), "cpu_count": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
               "torch": torch.__version__, "goal_speedup": 1.3, "runs": {}}
    for entry in args.configs.split(","):
        name, _, t = entry.partition("@")
        threads = int(t) if t else args.threads
        torch.set_num_threads(threads)
        heavy = name == "vit_b16"  # tens of seconds per batch-64 forward on the shared cores
        repeats = args.repeats or (2 if heavy else 15)
        r = bench_config(name, args.batch, repeats, 2, 8 if heavy else args.batch, device)
        r["threads"] = threads
        results["runs"][f"{name}@{threads}t"] = r
        print(describe(f"{name}@{threads}t", r), flush=True)
    out = Path(args.out_dir) / OUT.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

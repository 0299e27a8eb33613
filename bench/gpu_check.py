"""GPU check of the mixed-task engine: on CUDA in bf16, img/s of each runtime with a batch of 64
rows over N = 64 distinct tasks, against the bare backbone's forward at the same batch size.

Runtimes: shared trunk (linear probes, DTL), per-row adapter (LoRA, Adapter, ARC), early exit
(Dyn-LoRA at full depth) and token dispatch (DyT); one line each, plus a check that every answer
equals its task alone in fp32 on the same device. On a machine without a GPU it says so and exits 0.

    .venv/bin/python bench/gpu_check.py [--backbone vit_base_patch16_224] [--dtype bf16] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from petl_platform import build_model, create_backbone
from petl_platform.backbones import SHIPPED
from petl_platform.inference import Engine, Row

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = {"shared_trunk": ["linear", "dtl"], "per_row_adapter": ["lora", "adapter", "arc"],
            "early_exit": ["dyn_lora"], "token_dispatch": ["dyt"]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tasks(method: str, backbone, n: int) -> dict:
    out = {}
    for i in range(n):
        torch.manual_seed(i)
        m = build_model(method, backbone, 10)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        out[f"{method}-{i}"] = m.eval()
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(fn, batch: int, iters: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def replica_path(engine, pixels: torch.Tensor, rows, models, classes: list[str]) -> list:
    """What a Serve replica does per batch, without Ray: ``uint8`` pixels from host memory (4x fewer
    bytes than float32, normalized on the device), the engine, then one answer per row (softmax,
    top-k, the label) as the replica returns it."""
    from petl_platform.serving.request import answer

    return [answer(r.logits, classes, 3) for r in engine.run(pixels, rows, models)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=SHIPPED)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--device", default="cuda", help="cuda (the check); cpu only to try the script")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to measure (run it where a GPU is).")
        return 0
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": args.dtype,
              "backbone": args.backbone,
              "batch": args.batch, "tasks": args.tasks, "runtimes": {}}
    bb = create_backbone(args.backbone)
    x = torch.randn(args.batch, 3, *bb.patch_embed.img_size)
    # exactness first, fp32 on the device: a few tasks of every runtime in one batch
    ref_engine = Engine(bb, device=dev, merge_cache=0)
    mixed = {t: m for ms in RUNTIMES.values() for meth in ms for t, m in tasks(meth, bb, 2).items()}
    rows = [Row(i % args.batch, t) for i, t in enumerate(mixed)]
    got = ref_engine.run(x, rows, mixed)
    with torch.inference_mode():
        diff = max(float((r.logits - mixed[row.task](x[row.image:row.image + 1].to(dev))[0].float().cpu()).abs().max())
                   for r, row in zip(got, rows))
    report["fp32_max_abs_diff_vs_alone"] = diff
    print(f"{report['device']}: fp32 mixed batch of every runtime vs each task alone: max |diff| {diff:.1e}")
    engine = Engine(bb, device=dev, dtype=dtype, merge_cache=0)
    xd = x.to(dev, dtype)
    with torch.inference_mode():
        bare = rate(lambda: bb.forward_features(xd), args.batch, args.iters)
    report["bare_backbone_img_per_s"] = bare
    print(f"bare backbone forward, batch {args.batch}, {args.dtype}: {bare:,.0f} img/s")
    for runtime, methods in RUNTIMES.items():
        for method in methods:
            models = tasks(method, bb, args.tasks)
            names = list(models)
            rows = [Row(i, names[i % len(names)]) for i in range(args.batch)]
            r = rate(lambda: engine.run(x, rows, models), args.batch, args.iters)
            one = {names[0]: models[names[0]]}
            r1 = rate(lambda: engine.run(x, [Row(i, names[0]) for i in range(args.batch)], one), args.batch, args.iters)
            report["runtimes"][f"{runtime}/{method}"] = {"img_per_s": r, "vs_bare": r / bare, "one_task_img_per_s": r1,
                                                         "p5_ratio": r / r1}
            print(f"{runtime:16} {method:8} N={args.tasks}: {r:,.0f} img/s = {r / bare:.2f}x the bare backbone; "
                  f"N=1: {r1:,.0f} img/s (P5 {r / r1:.2f}x)")
            if method == "lora":  # G1 of the data plane: the replica's path, uint8 in and answers out
                u8 = torch.randint(0, 256, x.shape, dtype=torch.uint8)
                if dev.type == "cuda":
                    u8 = u8.pin_memory()
                classes = [str(c) for c in range(10)]
                rp = rate(lambda: replica_path(engine, u8, rows, models, classes), args.batch, args.iters)
                report["replica_path_lora"] = {"img_per_s": rp, "vs_bare": rp / bare, "vs_engine": rp / r}
                print(f"replica path (uint8 in, answers out) lora N={args.tasks}: {rp:,.0f} img/s = "
                      f"{rp / bare:.2f}x the bare backbone, {rp / r:.2f}x the engine alone")
            del models
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

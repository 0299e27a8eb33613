"""P4: peak memory of a training step, ViT-B/16 (random weights), batch 32: DTL vs LoRA vs full.

Paper (DTL, Table 2, GPU, batch 32): DTL 1.6 GB, LoRA 3.0 GB, full fine-tuning 4.7 GB. Goal here:
DTL <= 0.55x LoRA and <= 0.35x full.

Every method runs the same way in a fresh subprocess: build backbone + model + a batch, then
``steps`` training steps exactly as ``training/loop.py`` does them (``training_step`` ->
``backward`` -> ``after_backward`` -> AdamW over ``requires_grad`` parameters, ``zero_grad`` with
``set_to_none``), so the peak includes activations, gradients and optimizer state.

- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation after setup.
- CPU: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after setup) minus the RSS
  after setup. ``MALLOC_MMAP_THRESHOLD_`` is fixed so large tensors are mmapped and freed memory
  really leaves the RSS (otherwise glibc heap reuse blurs the peak).
The figure compared is that delta: what training adds on top of the model. ``with_weights_mb`` adds
the fp32 parameter bytes for a GPU-style total. Full fine-tuning = the linear-probe model with
every backbone tensor set trainable.

    nice .venv/bin/python bench/p4_train_memory.py [--quick] [--methods dtl lora full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"lora": 0.55, "full": 0.35}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, batch: int, steps: int, device: str, backbone_name: str = "vit_base_patch16_224") -> dict:
    """One method, one fresh process: the peak memory of ``steps`` training steps."""
    import torch

    from petl_platform import build_model, create_backbone, list_methods

    torch.manual_seed(0)
    dev = torch.device(device)
    backbone = create_backbone(backbone_name)
    if method == "full":
        model = build_model("linear", backbone, 100)
        model.requires_grad_(True)
    elif method not in list_methods():
        return {"method": method, "skipped": f"method {method!r} is not registered"}
    else:
        model = build_model(method, backbone, 100)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, *backbone.patch_embed.img_size, device=dev)
    y = torch.randint(0, 100, (batch,), device=dev)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model.training_step(x, y, 0.0).loss
        loss.backward()
        model.after_backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kb("VmHWM") * 1024
    delta_mb = (peak - base) / 2**20
    return {"method": method, "peak_delta_mb": delta_mb, "with_weights_mb": delta_mb + weights_mb,
            "weights_mb": weights_mb, "trainable_params": sum(p.numel() for p in params),
            "shared_prefix_blocks": model.shared_prefix_blocks, "device": dev.type, "steps": steps, "batch": batch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 training step instead of 2 (no steady-state optimizer state)")
    ap.add_argument("--methods", nargs="+", default=["dtl", "dtl_plus", "lora", "full", "linear"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbone", default="vit_base_patch16_224", help="random-weight ViT-B/16 by default; "
                    "the fidelity table uses the shipped backbone")
    ap.add_argument("--suffix", default="", help="output file p4_train_memory<SUFFIX>.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    steps = 1 if args.quick else 2
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args.child, args.batch, steps, args.device, args.backbone)))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results = {}
    for m in args.methods:
        cmd = [sys.executable, __file__, "--child", m, "--batch", str(args.batch), "--device", args.device,
               "--backbone", args.backbone]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            results[m] = {"method": m, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            results[m] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[m]
        shown = f"{r['peak_delta_mb']:.0f} MB (+weights {r['with_weights_mb']:.0f} MB)" if "peak_delta_mb" in r else r
        print(f"{m:>9}: {shown}", flush=True)
    ratios = {}
    if "peak_delta_mb" in results.get("dtl", {}):
        for ref, goal in GOALS.items():
            if "peak_delta_mb" not in results.get(ref, {}):
                print(f"dtl / {ref}: not measured ({results.get(ref, {}).get('skipped', 'not requested or failed')})")
                continue
            r = results["dtl"]["peak_delta_mb"] / results[ref]["peak_delta_mb"]
            rw = results["dtl"]["with_weights_mb"] / results[ref]["with_weights_mb"]
            ratios[f"dtl/{ref}"] = {"ratio": r, "ratio_with_weights": rw, "goal": goal, "met": r <= goal}
            print(f"dtl / {ref}: {r:.3f}x (with weights {rw:.3f}x; goal <= {goal}x) {'OK' if r <= goal else 'MISSED'}")
    report = {"benchmark": "p4_train_memory", "backbone": args.backbone + (" (random weights)" if args.backbone == "vit_base_patch16_224" else ""), "batch": args.batch,
              "steps": steps, "device": args.device, "measure": "cuda max_memory_allocated delta" if args.device == "cuda"
              else "peak RSS (VmHWM after clear_refs) minus RSS after setup, fresh process per method",
              "paper_gb": {"dtl": 1.6, "dtl_plus": 1.7, "lora": 3.0, "full": 4.7, "linear": 0.6},
              "results": results, "ratios": ratios}
    out = Path(args.out_dir) / f"p4_train_memory{args.suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    errors = [m for m, r in results.items() if "error" in r]
    if errors:
        print(f"failed: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

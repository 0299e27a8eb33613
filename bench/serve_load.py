"""Serving benchmarks through the whole HTTP path on a local Ray Serve deployment (127.0.0.1),
measured side by side in one run. The load generator runs in its own process (``load_gen.py``:
prebuilt raw HTTP requests on one asyncio loop, its CPU time reported); the in-process engine runs
in this process while the server is idle. Every figure of S1-S4 uses one LoRA task (p5-lora-0)
and the same 16 digits-1k test images, as PNG and as uint8 pixels at the model size:

- S1: served img/s at saturation, 16-image OIP v2 requests (binary UINT8 tensor), vs the engine in
  process at batch 32 on the same pixels (normalization counted): goal >= 0.8x.
- S2: served img/s at saturation, one PNG per ``/v1/predict`` JSON request, vs the engine in
  process on the PNGs at batch 32 (decode + transform counted): goal >= 0.4x.
- S3: served p50 latency with one request in flight vs one in-process batch-1 call: goal <= 2x.
- S4: at 4x S2's saturating concurrency: throughput vs saturation (>= 0.9x), p99/p50 of the
  admitted requests (<= 3x), the fraction shed with 503 and how many of those carry Retry-After.
- Served P2: a Dyn-LoRA task at a 50 % budget vs full depth (goal >= 1.8x); served P5: 32 LoRA
  tasks in flight vs one LoRA task (goal >= 0.85x). Each both as one PNG per /v1/predict request
  (what users send) and as 16-image OIP requests (what measures the engine rather than the
  per-request cost). P5 for 32 linear probes too (one PNG a request).
- P8: p50/p99 at 50 % of S2's saturation req/s (open loop, Poisson arrivals) and with one request
  in flight: goal p99 <= 3x p50. Served P1: one request for N shared-trunk tasks vs N requests.
- Replica kill: one TrunkBackbone replica (of 2) killed under load; failed vs in flight.
- G1 (GPU only): S1's served img/s vs the bare backbone in bf16 at the same batch.

Adapters are trained briefly on the shipped backbone and registered in a throwaway MLflow store;
figures go to bench/results/serve_load.json.

    nice .venv/bin/python bench/serve_load.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # load_gen, serve_inputs, serve_figures

RESULTS = Path(__file__).parent / "results"
KEY = "bench-key"


def _register_many(settings, bb, n_linear: int, dyn_task: str):
    """``n_linear`` probes (named p5-task-i; copies of one trained probe with its head re-seeded:
    serving cost, not accuracy, is measured here) and one calibrated Dyn-LoRA."""
    import torch

    from petl_platform.data import get_task
    from petl_platform.tracking.runs import log_and_register
    from petl_platform.training.run import finetune

    probe, _ = finetune("digits-1k", "linear", bb.petl_name, backbone_model=bb,
                        train_overrides={"epochs": 3, "progress": False})
    dyn, dyn_r = finetune(dyn_task, "dyn_lora", bb.petl_name, backbone_model=bb, budget=0.5,
                      train_overrides={"epochs": 3, "progress": False})
    names = []
    for i in range(n_linear + 1):
        model, task = (probe, f"p5-task-{i}") if i < n_linear else (dyn, dyn_task)
        if i < n_linear:
            torch.manual_seed(i)
            torch.nn.init.normal_(probe.head.weight, std=0.02)
        metrics = None if i < n_linear else {"val_accuracy": dyn_r["val_accuracy"], "test_accuracy": dyn_r["accuracy"]}
        log_and_register(settings, model, task, get_task("digits-1k" if i < n_linear else dyn_task).classes, "bench",
                         metrics=metrics)  # the re-seeded probes are not the trained one: no accuracy of theirs
        names.append(task)
    return names[:-1]


def _register_lora(settings, bb, n: int) -> list[str]:
    """``n`` LoRA tasks (p5-lora-i): one LoRA trained briefly, then each copy with its own re-seeded
    low-rank weights and head, so every task's delta differs (the hard case of P5)."""
    import torch

    from petl_platform.data import get_task
    from petl_platform.tracking.runs import log_and_register
    from petl_platform.training.run import finetune

    lora, _ = finetune("digits-1k", "lora", bb.petl_name, backbone_model=bb,
                       train_overrides={"epochs": 1, "progress": False})
    names = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        log_and_register(settings, lora, f"p5-lora-{i}", get_task("digits-1k").classes, "bench")
        names.append(f"p5-lora-{i}")
    return names


def _kill_one_replica(deployment: str) -> str:
    import ray
    from ray.util.state import list_actors

    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
              if a.class_name == f"ServeReplica:petl:{deployment}"]
    victim = actors[0]
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    return victim.name


def _deploy(args, tasks: list[str], cuda: bool) -> str:
    """The app through ``petl serve``'s launcher, with the config's replica counts fixed (a benchmark,
    not autoscaling: each deployment at its minimum) and two TrunkBackbone replicas (the kill)."""
    from petl_platform.backbones.factory import SHIPPED
    from serve_apps.petl_app import load_config, run_local

    path = str(Path(__file__).parents[1] / "serve_apps/configs" / ("gpu.yaml" if cuda else "local.yaml"))
    opts = []
    for d in load_config(path, tasks)["args"]["deployment_options"]:
        d = dict(d)
        auto = d.pop("autoscaling_config", None) or {}
        least = 2 if d["name"] == "TrunkBackbone" else 1
        d["num_replicas"] = max(least, int(d.get("num_replicas", auto.get("min_replicas", 1))))
        opts.append(d)
    gpu = [d for d in opts if d.get("ray_actor_options", {}).get("num_gpus")]
    for d in gpu:  # the GPU replicas share the one GPU
        d["ray_actor_options"] = {**d["ray_actor_options"], "num_gpus": 0.99 / sum(g["num_replicas"] for g in gpu)}
    # every replica caches all served adapters (capacity above the task count: no LRU thrash)
    return run_local(path, tasks, args.port, host="127.0.0.1",
                     args_overrides={"deployment_options": opts, "backbone": SHIPPED, "num_cpus_per_replica": 0.1,
                                     "capacity": len(tasks) + 2})


def _say(text: str) -> None:
    print(text, flush=True)


def _brief(fig: dict) -> dict:
    """A figure's headline for the log: its numbers, without the rounds."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items() if k not in ("rounds", "detail")}


def _measure(args, out: dict, ctx, inproc, task: str, pngs, pixels, loras, many) -> None:
    """Every figure in turn into ``out``; one that fails is recorded in ``out["errors"]`` (the report
    shows it) and the next still runs."""
    import serve_figures as sf

    def step(name, fn):
        t = time.time()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - recorded; main exits 1 after writing the rest
            out.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            _say(f"{name}: FAILED {type(e).__name__}: {e}")
            return
        out.update(res)
        for k, v in res.items():
            _say(f"{k} ({time.time() - t:.0f} s): {_brief(v)}")

    def p8():
        s2, s3 = out["s2"], out["s3"]
        mid = sorted(s3["rounds"], key=lambda r: r["served_p99_ms"] / r["served_p50_ms"])[len(s3["rounds"]) // 2]
        return {"p8": sf.p8(ctx, task, pngs, statistics.median(r["served_rps"] for r in s2["rounds"]),
                            {"p50_ms": mid["served_p50_ms"], "p99_ms": mid["served_p99_ms"], "requests": mid["requests"]})}

    step("S1", lambda: {"s1": sf.s1(ctx, inproc, task, pixels, args.s1_levels)})
    step("S2-S4", lambda: sf.s2_s3_s4(ctx, inproc, task, pngs, args.s2_levels))
    step("P8", p8)
    ctx.repeats = args.pair_repeats
    c_one, c_multi = out.get("s2", {}).get("concurrency", 16), out.get("s1", {}).get("concurrency", 4)
    step("P2 served", lambda: sf.served_p2(ctx, "digits-1k", pngs, pixels, c_one, c_multi))
    step("P5 served", lambda: sf.served_p5(ctx, loras, pngs, pixels, "p5_lora"))
    if len(many) >= 2:
        step("P5 served (linear)", lambda: sf.served_p5(ctx, many, pngs, pixels, "p5", multi=False))
    step("P1 served", lambda: {"served_p1": sf.served_p1(ctx, many[:8], pngs[0])})
    step("kill", lambda: {"replica_kill": sf.replica_kill(ctx, many, pngs[0], lambda: _kill_one_replica("TrunkBackbone"),
                                                          args.kill_s)})


def run(args) -> dict:
    import torch
    from ray import serve

    from load_gen import LoadGen
    from petl_platform import create_backbone
    from petl_platform.backbones.factory import SHIPPED
    from petl_platform.tracking.settings import TrackingSettings
    from serve_figures import Ctx
    from serve_inputs import InProcess, bare_bf16_img_s, images

    t0, stages = time.time(), {}
    settings = TrackingSettings.from_env().prepare()
    bb = create_backbone(SHIPPED)
    many = _register_many(settings, bb, args.linear, "digits-1k")
    loras = _register_lora(settings, bb, args.tasks)
    stages["train_register_s"] = round(time.time() - t0, 1)
    task, cuda = loras[0], torch.cuda.is_available()
    pngs, pixels = images(bb)
    inproc = InProcess(settings, task, SHIPPED, dtype="bf16" if cuda else None)
    t1 = time.time()
    url = _deploy(args, [*many, *loras, "digits-1k"], cuda)
    stages["deploy_s"] = round(time.time() - t1, 1)
    out = {"task": task, "images": len(pngs), "image_size": list(pixels.shape[1:3]), "tasks": args.tasks,
           "linear_tasks": len(many), "quick": args.quick, "window_s": args.dur, "repeats": args.repeats,
           "pair_repeats": args.pair_repeats, "device": "cuda" if cuda else "cpu", "in_process_threads": inproc.threads}
    gen = LoadGen(url)
    ctx = Ctx(gen, Path(tempfile.mkdtemp(prefix="petl-load-")), {"Authorization": f"Bearer {KEY}"}, args.dur, args.warm,
              args.base_s, args.repeats)
    t2 = time.time()
    try:
        _measure(args, out, ctx, inproc, task, pngs, pixels, loras, many)
    finally:
        gen.close()
    stages["measure_s"] = round(time.time() - t2, 1)
    if cuda and "s1" in out:
        served = statistics.median(r["served_img_s"] for r in out["s1"]["rounds"])
        bare = bare_bf16_img_s(SHIPPED, len(pixels), args.base_s)
        out["g1"] = {"served_img_s": served, "bare_bf16_img_s": bare, "ratio": served / bare, "batch": len(pixels),
                     "gpu": torch.cuda.get_device_name()}
    else:
        out["g1"] = {"skipped": "S1 failed" if cuda else "no GPU on this machine (torch.cuda.is_available() is False)"}
    out["generator"] = {"process": "bench/load_gen.py, its own process", "max_cpu_frac": max(ctx.cpu, default=None),
                        "median_cpu_frac": statistics.median(ctx.cpu) if ctx.cpu else None, "measurements": len(ctx.cpu)}
    out["stages_s"] = stages
    serve.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", type=int, default=32, help="LoRA tasks of served P5")
    ap.add_argument("--linear", type=int, default=32, help="linear probes (P5 linear, served P1, replica kill)")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON goes")
    args = ap.parse_args()
    q = args.quick
    args.dur, args.warm, args.base_s = (2.0, 0.5, 1.5) if q else (5.0, 1.0, 3.0)
    args.repeats, args.pair_repeats = (3, 2) if q else (5, 3)
    args.s1_levels = [1, 2, 4, 8] if q else [1, 2, 4, 8, 16]
    args.s2_levels = [4, 8, 16, 32] if q else [2, 4, 8, 16, 32, 64]
    args.kill_s = 6.0 if q else 15.0
    os.environ.setdefault("PETL_HOME", tempfile.mkdtemp(prefix="petl-serve-bench-"))
    os.environ["PETL_API_KEYS"] = f"{KEY}=*"
    t0 = time.time()
    out = run(args)
    import ray
    ray.shutdown()
    out["stages_s"]["total_s"] = round(time.time() - t0, 1)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")
    if out.get("errors"):
        sys.exit(f"serve bench: {len(out['errors'])} step(s) failed: {', '.join(out['errors'])} (the rest is written)")


if __name__ == "__main__":
    main()

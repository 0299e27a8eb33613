"""Serving benchmarks through the whole HTTP path (async httpx load generator against a local Ray
Serve deployment on 127.0.0.1, bounded request counts), measured side by side in one run:

- P5: 32 requests in flight for 32 different tasks (mixed-task batches) vs 32 in flight for one
  task: throughput ratio (goal >= 0.85x), for linear probes (which share the whole trunk) and,
  the hard case, for LoRA tasks (per-row low-rank deltas in every block): ``p5_lora``.
- P8: p50/p99 latency at 50 % of the measured saturation throughput (open loop, Poisson
  arrivals) and at batch 1 (one request at a time): goal p99 <= 3x p50.
- Served P1: one request for N shared-trunk tasks vs N single-task requests (task-answers/s).
- Served P2: a Dyn-* task at a 50 % budget vs the same task at full depth (threshold 1.0).
- Replica kill: one TrunkBackbone replica (of 2) killed under load; failed requests vs requests
  in flight on it.

Adapters are trained briefly on the shipped backbone and registered in a throwaway MLflow store;
figures go to bench/results/serve_load.json.

    nice .venv/bin/python bench/serve_load.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

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


def _image() -> bytes:
    from PIL import Image

    from petl_platform.data import get_task

    buf = io.BytesIO()
    Image.fromarray(get_task("digits-1k").splits["test"][0][0]).save(buf, format="PNG")
    return buf.getvalue()


async def _one(client, body) -> tuple[float, int]:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/predict", json=body)
        status = r.status_code
    except Exception:  # noqa: BLE001 - a dropped connection counts as a failure
        status = 0
    return time.perf_counter() - t0, status


async def closed_loop(client, bodies: list[dict], concurrency: int, n: int) -> dict:
    """``concurrency`` requests always in flight, ``n`` in all; bodies cycled. Throughput + latencies."""
    lat, statuses, it = [], [], iter(range(n))

    async def worker(w):
        for i in it:
            dt, st = await _one(client, bodies[(i + w) % len(bodies)])
            lat.append(dt)
            statuses.append(st)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": n, "rps": n / wall, "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * sorted(lat)[max(0, int(0.99 * len(lat)) - 1)],
            "failed": sum(s != 200 for s in statuses),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}


async def open_loop(client, body: dict, rate: float, n: int, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` req/s, ``n`` requests: the latency a user sees at that load."""
    rng = random.Random(seed)
    tasks, t = [], time.perf_counter()
    for _ in range(n):
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(_one(client, body)))
    res = await asyncio.gather(*tasks)
    lat = sorted(r[0] for r in res)
    return {"rate": rate, "requests": n, "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * lat[max(0, int(0.99 * len(lat)) - 1)], "failed": sum(r[1] != 200 for r in res)}


def _kill_one_replica(deployment: str) -> str:
    import ray
    from ray.util.state import list_actors

    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
              if a.class_name == f"ServeReplica:petl:{deployment}"]
    victim = actors[0]
    ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
    return victim.name


async def run(args) -> dict:
    import httpx

    from petl_platform import create_backbone
    from petl_platform.backbones.factory import SHIPPED
    from petl_platform.tracking.settings import TrackingSettings

    settings = TrackingSettings.from_env().prepare()
    bb = create_backbone(SHIPPED)
    many = _register_many(settings, bb, args.tasks, "digits-1k")
    loras = _register_lora(settings, bb, args.tasks)
    img = base64.b64encode(_image()).decode()
    from ray import serve

    from petl_platform.cluster.connect import ensure_ray
    from serve_apps.petl_app import build_app, load_config

    cfg = load_config(str(Path(__file__).parents[1] / "serve_apps/configs/local.yaml"), [*many, *loras, "digits-1k"])
    for d in cfg["args"]["deployment_options"]:  # fixed replica counts: a benchmark, not autoscaling
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 2 if d["name"] == "TrunkBackbone" else 1
    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    # every replica caches all served adapters (capacity above the task count: no LRU thrash)
    serve.run(build_app({**cfg["args"], "backbone": SHIPPED, "num_cpus_per_replica": 0.1,
                         "capacity": 2 * len(many) + len(loras) + 2}), name="petl",
              route_prefix="/")
    out = {"tasks": args.tasks, "n": args.n}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as c:
        one = {"image": img, "tasks": [many[0]]}
        await closed_loop(c, [one], 8, 32)  # warm-up: replicas load their adapters
        await closed_loop(c, [{"image": img, "tasks": [t]} for t in many], 8, 64)
        rounds = []
        for _ in range(args.repeats):  # P5, interleaved
            mixed = await closed_loop(c, [{"image": img, "tasks": [t]} for t in many], 32, args.n)
            single = await closed_loop(c, [one], 32, args.n)
            rounds.append({"mixed_rps": mixed["rps"], "single_rps": single["rps"], "ratio": mixed["rps"] / single["rps"]})
        out["p5"] = {"rounds": rounds, "ratio": statistics.median(r["ratio"] for r in rounds), "goal": 0.85}
        print(f"P5 mixed-task/one-task throughput: {out['p5']['ratio']:.2f}x "
              f"({[round(r['ratio'], 2) for r in rounds]})", flush=True)

        # P5 on the hard case: LoRA tasks touch every block, so mixed batches need per-row deltas
        lora_one = {"image": img, "tasks": [loras[0]]}
        await closed_loop(c, [{"image": img, "tasks": [t]} for t in loras], 8, 2 * len(loras))  # load them all
        rounds = []
        for _ in range(args.repeats):
            mixed = await closed_loop(c, [{"image": img, "tasks": [t]} for t in loras], 32, args.n)
            single = await closed_loop(c, [lora_one], 32, args.n)
            rounds.append({"mixed_rps": mixed["rps"], "single_rps": single["rps"], "ratio": mixed["rps"] / single["rps"]})
        out["p5_lora"] = {"tasks": len(loras), "rounds": rounds, "ratio": statistics.median(r["ratio"] for r in rounds),
                          "goal": 0.85}
        print(f"P5 (LoRA) {len(loras)} LoRA tasks in flight vs one LoRA task: {out['p5_lora']['ratio']:.2f}x "
              f"({[round(r['ratio'], 2) for r in rounds]})", flush=True)

        sat = await closed_loop(c, [one], 32, args.n)
        half = await open_loop(c, one, 0.5 * sat["rps"], args.n)
        seq = await closed_loop(c, [one], 1, max(20, args.n // 4))
        out["p8"] = {"saturation_rps": sat["rps"], "at_half_saturation": half, "batch1": seq,
                     "ratio_half": half["p99_ms"] / half["p50_ms"], "ratio_batch1": seq["p99_ms"] / seq["p50_ms"],
                     "goal": 3.0}
        print(f"P8 saturation {sat['rps']:.1f} req/s; at 50 %: p50 {half['p50_ms']:.1f} ms p99 {half['p99_ms']:.1f} ms "
              f"({out['p8']['ratio_half']:.2f}x); batch 1: p50 {seq['p50_ms']:.1f} p99 {seq['p99_ms']:.1f} "
              f"({out['p8']['ratio_batch1']:.2f}x)", flush=True)

        k = min(8, len(many))
        fan = await closed_loop(c, [{"image": img, "tasks": many[:k]}], 8, args.n // 4)
        sep = await closed_loop(c, [{"image": img, "tasks": [t]} for t in many[:k]], 8, args.n // 4 * k)
        out["served_p1"] = {"tasks_per_request": k, "fan_out_answers_per_s": fan["rps"] * k,
                            "separate_answers_per_s": sep["rps"], "speedup": fan["rps"] * k / sep["rps"]}
        print(f"served P1 ({k} trunk tasks in one request vs {k} requests): {out['served_p1']['speedup']:.2f}x", flush=True)

        dyn_full = {"image": img, "tasks": ["digits-1k"], "threshold": 1.0}
        dyn_half = {"image": img, "tasks": ["digits-1k"], "budget": 0.5}
        await closed_loop(c, [dyn_full, dyn_half], 8, 32)  # warm-up: load + calibrate the Dyn-* task
        p2 = []
        for _ in range(args.repeats):
            full = await closed_loop(c, [dyn_full], 32, args.n)
            half_b = await closed_loop(c, [dyn_half], 32, args.n)
            p2.append(half_b["rps"] / full["rps"])
        out["served_p2"] = {"speedup": statistics.median(p2), "rounds": p2}
        print(f"served P2 (budget 50 % vs full depth): {out['served_p2']['speedup']:.2f}x {[round(r, 2) for r in p2]}",
              flush=True)

        # Replica kill: 2 TrunkBackbone replicas, steady load, one killed (no restart by Ray; Serve replaces it).
        load = asyncio.create_task(closed_loop(c, [{"image": img, "tasks": [t]} for t in many], 16, args.n * 2))
        await asyncio.sleep(1.0)
        victim = await asyncio.to_thread(_kill_one_replica, "TrunkBackbone")
        res = await load
        out["replica_kill"] = {"killed": victim, "requests": res["requests"], "failed": res["failed"],
                               "in_flight_bound": 16}
        out["replica_kill"]["statuses"] = res["statuses"]
        print(f"replica kill: {res['failed']} of {res['requests']} requests failed (at most 16 were in flight; "
              f"statuses {res['statuses']})", flush=True)
    serve.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON (and PNGs) go")
    args = ap.parse_args()
    args.n = 128 if args.quick else 384
    args.repeats = 2 if args.quick else 3
    os.environ.setdefault("PETL_HOME", tempfile.mkdtemp(prefix="petl-serve-bench-"))
    os.environ["PETL_API_KEYS"] = f"{KEY}=*"
    out = asyncio.run(run(args))
    import ray
    ray.shutdown()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

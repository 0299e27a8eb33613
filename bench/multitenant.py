"""P9-P11: multi-tenant serving on one replica's adapter store and engine, in-process (no Ray), on
the shipped backbone, with the real MLflow registry (SQLite) over a real S3-compatible server
(moto's server mode on 127.0.0.1, reached through a proxy that can be made to hang).

- **P9, cold load:** time from a request for a never-seen task to its answer (registry look-up, S3
  download, build on the frozen backbone, the engine's check and FLOP count, then one batch-1 engine
  call), for LoRA and Dyn-LoRA tasks. Goal <= 100 ms p50 on the shipped backbone; Dyn-LoRA carries
  its budget curve in the artifact, so it no longer calibrates on load.
- **P10, isolation:** p99 latency of an already-loaded LoRA task (batch-1 requests, closed loop)
  while 20 cold tasks load, and while the store hangs (a cold task's download stalls), each against
  the same task's p99 on a quiet replica, measured in the same run. Goal <= 1.5x.
- **P11, scale:** N registered LoRA tasks (1,000 by default) served from one replica: batches of
  32 requests whose tasks follow a Zipf(1.1) law, each batch one engine call after its cold tasks
  load, against batches of 32 requests for one task; at a store budget that holds every task, and
  at one that holds a tenth of them (more hot tasks than slots). Goal >= 0.8x. Also: the resident
  bytes per task (the adapter's own tensors) and the process RSS growth per resident task.

    .venv/bin/python bench/multitenant.py [--quick] [--tasks N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the S3 stall proxy the fault tests use

from petl_platform import build_model, create_backbone  # noqa: E402
from petl_platform.backbones import SHIPPED  # noqa: E402
from petl_platform.inference import Engine, Row  # noqa: E402
from petl_platform.serving.models import TaskModelCache  # noqa: E402
from petl_platform.tracking.runs import log_and_register  # noqa: E402
from petl_platform.tracking.settings import TrackingSettings  # noqa: E402

BUCKET = "petl-bench"
GOALS = {"P9": 100.0, "P10": 1.5, "P11": 0.8}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(xs, q) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Store:
    """MLflow on SQLite, artifacts on moto's S3 server (its own process, as a store is) behind a
    stall proxy; a file store when moto is not installed."""

    def __init__(self, root: Path):
        import importlib.util
        import socket
        import subprocess

        self.server, self.proxy = None, None
        if importlib.util.find_spec("moto") is None:
            artifacts, self.kind = str(root / "artifacts"), "local files (moto not installed)"
        else:
            from platform_stack import StallProxy, free_port

            port = free_port()
            self.server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            self.proxy = StallProxy(port)
            os.environ.update({"MLFLOW_S3_ENDPOINT_URL": self.proxy.url, "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
            from petl_platform.tracking.settings import s3_client

            s3_client().create_bucket(Bucket=BUCKET)
            artifacts, self.kind = f"s3://{BUCKET}/mlflow", "S3 (moto server on 127.0.0.1)"
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        self.settings = TrackingSettings(f"sqlite:///{root / 'mlflow.db'}", artifacts, str(root / "ray")).prepare()

    def close(self):
        if self.proxy:
            self.proxy.close()
        if self.server:
            self.server.terminate()
            self.server.wait(10)


def register(settings, bb, names, method, hp, progress: str):
    from tqdm import tqdm

    for i, name in enumerate(tqdm(names, desc=progress, mininterval=5)):
        torch.manual_seed(i)
        model = build_model(method, bb, 10, **hp)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        if method.startswith("dyn_"):  # the curve training stores: serving reads it, never calibrates
            model.budget_thresholds = {0.5: [0.9] * (model.stages - 1)}
        log_and_register(settings, model, name, [str(c) for c in range(10)], experiment="bench-multitenant")


def answer(cache, engine, task, x) -> None:
    e = cache.get(task)
    engine.run(x, [Row(0, task)], {task: e.model})


# ------------------------------------------------------------------------------------------ P9
def p9(store, bb, engine, n: int) -> dict:
    out = {}
    x = torch.randn(1, 3, *engine.image_size)
    for method, hp in (("lora", {}), ("dyn_lora", {})):
        names = [f"p9-{method}-{i}" for i in range(n)]
        register(store.settings, bb, names, method, hp, f"P9 register {method}")
        cache = TaskModelCache(bb, store.settings, prepare=lambda t, m: engine.info(t, m).gflops)
        answer(cache, engine, names[0], x)  # the replica's first load pays imports and allocator growth
        ms = []
        for name in names[1:]:
            t0 = time.perf_counter()
            answer(cache, engine, name, x)
            ms.append(1000 * (time.perf_counter() - t0))
        hot = []
        for _ in range(20):
            t0 = time.perf_counter()
            answer(cache, engine, names[-1], x)
            hot.append(1000 * (time.perf_counter() - t0))
        out[method] = {"cold_ms_p50": round(statistics.median(ms), 1), "cold_ms_p99": round(pct(ms, 0.99), 1),
                       "loads": len(ms), "warm_ms_p50": round(statistics.median(hot), 1),
                       "met": statistics.median(ms) <= GOALS["P9"]}
        print(f"P9 {method}: cold p50 {out[method]['cold_ms_p50']} ms, p99 {out[method]['cold_ms_p99']} ms "
              f"(warm {out[method]['warm_ms_p50']} ms)", flush=True)
        cache.close()
    return out


# ----------------------------------------------------------------------------------------- P10
def p10(store, bb, engine, seconds: float) -> dict:
    names = [f"p10-{i}" for i in range(21)]
    register(store.settings, bb, names + ["p10-stuck"], "lora", {}, "P10 register")
    lock = threading.Lock()  # one engine call at a time, as in a replica's batcher

    def one_phase(cache, start_fn) -> list[float]:
        """Closed-loop batch-1 requests for the hot task for ``seconds``; ``start_fn`` runs first."""
        x = torch.randn(1, 3, *engine.image_size)

        async def loop():
            lat, t_end = [], time.perf_counter() + seconds
            start_fn()
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                e = await cache.aget("p10-0")
                await asyncio.to_thread(locked_run, x, e)
                lat.append(1000 * (time.perf_counter() - t0))
            return lat

        def locked_run(x, e):
            with lock:
                engine.run(x, [Row(0, "p10-0")], {"p10-0": e.model})

        return asyncio.run(loop())

    def fresh_cache():
        c = TaskModelCache(bb, store.settings, prepare=lambda t, m: engine.info(t, m).gflops, load_timeout_s=2)
        c.get("p10-0")
        return c

    quiet_cache = fresh_cache()
    for _ in range(20):
        answer(quiet_cache, engine, "p10-0", torch.randn(1, 3, *engine.image_size))
    quiet = one_phase(quiet_cache, lambda: None)
    quiet_cache.close()
    # 20 cold tasks load (the store's 2 loader threads) while the hot task is served: both phases on fresh caches
    loading_cache = fresh_cache()
    futures = []
    loading = one_phase(loading_cache, lambda: futures.extend(loading_cache.load(n) for n in names[1:]))
    loaded = sum(f.done() and f.exception() is None for f in futures)
    loading_cache.close()
    hang = {}
    if store.proxy is not None:
        hung_cache = fresh_cache()
        store.proxy.stalled.set()
        try:
            stuck = []
            hanging = one_phase(hung_cache, lambda: stuck.append(hung_cache.load("p10-stuck")))
            hang = {"hot_p99_ms": round(pct(hanging, 0.99), 1), "requests": len(hanging),
                    "stuck_load_done_during": stuck[0].done()}
        finally:
            store.proxy.stalled.clear()
        hung_cache.close()
    q99 = pct(quiet, 0.99)
    out = {"seconds": seconds, "quiet": {"p50_ms": round(statistics.median(quiet), 1), "p99_ms": round(q99, 1),
                                         "requests": len(quiet)},
           "while_20_cold_loads": {"p50_ms": round(statistics.median(loading), 1), "p99_ms": round(pct(loading, 0.99), 1),
                                   "requests": len(loading), "cold_tasks_loaded_in_window": loaded,
                                   "ratio_p99": round(pct(loading, 0.99) / q99, 2)},
           "goal": f"<= {GOALS['P10']}x the quiet p99"}
    if hang:
        hang["ratio_p99"] = round(hang["hot_p99_ms"] / q99, 2)
        out["while_store_hangs"] = hang
    print(f"P10: quiet p99 {q99:.1f} ms; during 20 cold loads {out['while_20_cold_loads']['ratio_p99']}x; "
          f"store hung {hang.get('ratio_p99')}x", flush=True)
    return out


# ----------------------------------------------------------------------------------------- P11
def p11(store, bb, engine, n: int, batches: int, rounds: int) -> dict:
    names = [f"p11-{i}" for i in range(n)]
    register(store.settings, bb, names, "lora", {}, f"P11 register {n} LoRA tasks")
    rng = np.random.default_rng(0)
    ranks = np.arange(1, n + 1)
    p = ranks ** -1.1
    p /= p.sum()
    x = torch.randn(32, 3, *engine.image_size)
    probe = build_model("lora", bb, 10)
    from petl_platform.serving.models import own_tensors

    per_task = sum(t.numel() * t.element_size() for t in own_tensors(probe, bb))
    del probe

    def serve_batches(cache, draws) -> tuple[float, list[float]]:
        t0, lat = time.perf_counter(), []
        for tasks in draws:
            b0 = time.perf_counter()
            entries = {t: cache.get(t) for t in dict.fromkeys(tasks)}
            engine.run(x, [Row(i, t) for i, t in enumerate(tasks)], {t: e.model for t, e in entries.items()})
            lat.append(1000 * (time.perf_counter() - b0))
        return time.perf_counter() - t0, lat

    results = {}
    for label, budget_mb in (("all_resident", 1.2 * n * per_task / 2**20), ("tenth_resident", 0.1 * n * per_task / 2**20)):
        cache = TaskModelCache(bb, store.settings, capacity_mb=budget_mb,
                               prepare=lambda t, m: engine.info(t, m).gflops)
        rss0 = rss_mb()
        # warm-up: every task once (the all-resident case then serves from memory only)
        for i in range(0, n, 32):
            chunk = names[i:i + 32]
            serve_batches(cache, [chunk + [chunk[0]] * (32 - len(chunk))])
        rss1 = rss_mb()
        one = [["p11-0"] * 32] * batches
        serve_batches(cache, one[:3])
        ratios, mixed_lat, single_lat, distinct = [], [], [], []
        for _ in range(rounds):  # interleaved: background load hits both alike
            draws = [list(rng.choice(names, size=32, p=p)) for _ in range(batches)]
            distinct += [len(set(d)) for d in draws]
            t_single, ls = serve_batches(cache, one)
            t_mixed, lm = serve_batches(cache, draws)
            ratios.append(t_single / t_mixed)
            mixed_lat += lm
            single_lat += ls
        snap = cache.snapshot()
        results[label] = {"budget_mb": round(budget_mb, 1), "ratio_median": round(statistics.median(ratios), 3),
                          "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                          "mixed_img_per_s": round(32 * batches / (sum(mixed_lat) / 1000 / rounds), 1),
                          "single_img_per_s": round(32 * batches / (sum(single_lat) / 1000 / rounds), 1),
                          "batch_p50_ms": round(statistics.median(mixed_lat), 1),
                          "batch_p99_ms": round(pct(mixed_lat, 0.99), 1),
                          "single_batch_p99_ms": round(pct(single_lat, 0.99), 1),
                          "distinct_tasks_per_batch_mean": round(float(np.mean(distinct)), 1),
                          "resident": snap["resident"], "loads": snap["loads"], "evictions": snap["evictions"],
                          "rss_growth_mb_per_resident_task": round((rss1 - rss0) / max(1, snap["resident"]), 3),
                          "met": statistics.median(ratios) >= GOALS["P11"]}
        print(f"P11 {label} ({budget_mb:.0f} MB): {results[label]['ratio_median']}x one-task throughput, "
              f"batch p99 {results[label]['batch_p99_ms']} ms vs {results[label]['single_batch_p99_ms']} ms single, "
              f"{snap['resident']} resident, {snap['evictions']} evictions", flush=True)
        cache.close()
    return {"tasks": n, "batch": 32, "batches_per_round": batches, "rounds": rounds, "zipf_s": 1.1,
            "adapter_bytes_per_task": per_task, "results": results, "goal": f">= {GOALS['P11']}x"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks and rounds (300 tasks for P11)")
    ap.add_argument("--tasks", type=int, default=None, help="P11 registered tasks (default 1000; --quick 300)")
    ap.add_argument("--backbone", default=SHIPPED)
    ap.add_argument("--only", default="P9,P10,P11")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",")}
    n = args.tasks or (300 if args.quick else 1000)
    torch.manual_seed(0)
    bb = create_backbone(args.backbone)
    engine = Engine(bb)
    out = {"backbone": args.backbone, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="petl-bench-mt-") as tmp:
        store = Store(Path(tmp))
        out["store"] = store.kind
        try:
            if "P9" in only:
                out["P9"] = p9(store, bb, engine, 11 if args.quick else 31)
            if "P10" in only:
                out["P10"] = p10(store, bb, engine, 4.0 if args.quick else 8.0)
            if "P11" in only:
                out["P11"] = p11(store, bb, engine, n, 10 if args.quick else 20, 3 if args.quick else 5)
        finally:
            store.close()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "multitenant.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where a served request's time goes: py-spy samples every process on the path (Serve's HTTP
proxy, the Ingress replica, the TaskAdapters replica) and the load generator, while a closed loop
of one-PNG ``/v1/predict`` requests (or ``--images K`` per request) runs against one LoRA task.
Each process's samples are sorted into stages by the frames they hold (first match wins, from the
innermost frame out), and the stages are printed as shares of the process's samples and as CPU
milliseconds per image.

    nice .venv/bin/python bench/serve_profile.py [--images 1] [--concurrency 16] [--seconds 15]

Figures go to bench/results/serve_profile.json (or ``--out-dir``). Needs py-spy (root, or
ptrace rights on the Ray workers).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KEY = "bench-key"

# (stage, substrings of a frame "function (file:line)"): the innermost frame that matches names the stage
STAGES = [
    ("engine (model compute)", ["inference/engine.py", "torch/nn/", "methods/"]),
    ("image decode + resize", ["PIL/", "decode_many", "decode_pixels", "open_rgb", "transforms.py"]),
    ("base64 + JSON", ["base64.py", "json/", "_b64", "orjson", "jsonable_encoder", "JSONResponse", "render"]),
    ("request parsing (multipart, body)", ["multipart", "formparsers", "_read", "_body", "stream"]),
    ("pickling + object transfer", ["serialization.py", "pickle", "cloudpickle", "_raylet", "serialize"]),
    ("Serve routing + handles", ["serve/_private/router", "request_router", "handle.py", "replica_scheduler",
                                 "serve/_private/replica.py", "proxy_router", "serve/_private/proxy"]),
    ("HTTP server (uvicorn, h11, starlette, fastapi)", ["uvicorn", "h11", "starlette", "fastapi", "httptools"]),
    ("batching (serve.batch)", ["batching.py"]),
    ("metrics + logging", ["metrics", "logging", "prometheus", "opentelemetry"]),
    ("asyncio event loop", ["asyncio/", "uvloop"]),
    ("idle (event loop / thread parked)", ["threading.py", "concurrent/futures", "queue.py"]),
]


# an innermost frame that is an event loop's or a worker's own loop: it is parked in native code
# (epoll, a condition wait), which py-spy cannot tell from running: counted as idle, not as work
IDLE_LEAVES = ("_run_router_event_loop", "_run_user_code_event_loop", "Worker.main_loop", "run_forever",
               "_run_once", "select (selectors.py", "wait (threading.py", "_worker (concurrent")


def classify(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    if not frames[0] or any(k in frames[0] for k in IDLE_LEAVES):
        return "idle (event loop / thread parked)"
    for f in frames:
        for stage, keys in STAGES:
            if any(k in f for k in keys):
                return stage
    return "other"


def read_raw(path: str) -> Counter:
    """py-spy's ``--format raw`` (collapsed stacks: ``frame;frame;... count``) → stage counts."""
    c: Counter = Counter()
    if not os.path.exists(path):
        return c
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        if n.isdigit():
            c[classify(stack)] += int(n)
    return c


def _png() -> bytes:
    import io

    from PIL import Image

    from petl_platform.data import get_task

    buf = io.BytesIO()
    Image.fromarray(get_task("fashion_mnist-1k").splits["test"][0][0]).save(buf, format="PNG")
    return buf.getvalue()


LOAD = r"""
import asyncio, json, sys, time, httpx
url, body, conc, seconds = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), float(sys.argv[4])
async def main():
    n, lat = 0, []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=256),
                                 headers={"Authorization": "Bearer %s", "content-type": "application/json"}) as c:
        end = time.perf_counter() + seconds
        async def worker():
            nonlocal n
            while time.perf_counter() < end:
                t0 = time.perf_counter(); r = await c.post("/v1/predict", content=body)
                lat.append(time.perf_counter() - t0); n += r.status_code == 200
        t0 = time.perf_counter(); await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    lat.sort()
    print(json.dumps({"ok": n, "wall": wall, "rps": n / wall, "p50_ms": 1e3 * lat[len(lat) // 2],
                      "cpu_s": time.process_time()}))
asyncio.run(main())
""" % KEY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--port", type=int, default=8131)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per replica (build_app 'threads')")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the Ray cluster (e.g. Serve flags)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    for kv in args.env:
        os.environ[kv.split("=", 1)[0]] = kv.split("=", 1)[1]
    os.environ.setdefault("PETL_HOME", tempfile.mkdtemp(prefix="petl-serve-profile-"))
    os.environ["PETL_API_KEYS"] = f"{KEY}=*"

    import ray
    from ray import serve
    from ray.util.state import list_actors

    from petl_platform import create_backbone
    from petl_platform.backbones.factory import SHIPPED
    from petl_platform.cluster.connect import ensure_ray
    from petl_platform.tracking.settings import TrackingSettings
    from serve_apps.petl_app import build_app, load_config

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import _register_lora

    settings = TrackingSettings.from_env().prepare()
    task = _register_lora(settings, create_backbone(SHIPPED), 1)[0]
    cfg = load_config(str(Path(__file__).parents[1] / "serve_apps/configs/local.yaml"), [task])
    for d in cfg["args"]["deployment_options"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    ensure_ray(log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    serve.run(build_app({**cfg["args"], "backbone": SHIPPED, **({"threads": args.threads} if args.threads else {})}),
              name="petl", route_prefix="/")
    img = base64.b64encode(_png()).decode()
    body = json.dumps({"image": img, "tasks": [task]} if args.images == 1 else
                      {"images": [img] * args.images, "tasks": [task]})
    url = f"http://127.0.0.1:{args.port}"
    subprocess.run([sys.executable, "-c", LOAD, url, body, "4", "3"], check=True, capture_output=True)  # warm-up

    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    pids = {"proxy": next(a.pid for a in alive if a.class_name == "ProxyActor"),
            "Ingress": next(a.pid for a in alive if a.class_name.endswith(":Ingress")),
            "TaskAdapters": next(a.pid for a in alive if a.class_name.endswith(":TaskAdapters"))}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pyspy-"))
    def cpu_s(pid: int) -> float:  # user + system CPU seconds of a process, all its threads
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    load = subprocess.Popen([sys.executable, "-c", LOAD, url, body, str(args.concurrency), str(args.seconds + 4)],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    spies = {name: subprocess.Popen(["py-spy" if not os.path.exists(Path(sys.executable).parent / "py-spy")
                                     else str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                     "--duration", str(int(args.seconds)), "--rate", "100", "--format", "raw",
                                     "--nonblocking", "-o", str(tmp / f"{name}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in {**pids, "load generator": load.pid}.items()}
    watched = {**pids, "load generator": load.pid}
    cpu0 = {n: cpu_s(p) for n, p in watched.items()}
    t_cpu = time.perf_counter()
    for p in spies.values():
        p.wait()
    cpu = {n: cpu_s(p) - cpu0[n] for n, p in watched.items()}
    window = time.perf_counter() - t_cpu
    gen = json.loads(load.communicate()[0].strip().splitlines()[-1])
    images_per_s = gen["rps"] * args.images
    report = {"images_per_request": args.images, "concurrency": args.concurrency, "seconds": args.seconds,
              "env": args.env, "threads": args.threads,
              "load": gen, "images_per_s": images_per_s, "processes": {}}
    print(f"{gen['rps']:.1f} req/s = {images_per_s:.1f} img/s, p50 {gen['p50_ms']:.1f} ms "
          f"(load generator: {gen['cpu_s']:.1f} CPU-s)")
    images = images_per_s * window  # served while py-spy sampled
    idle = "idle (event loop / thread parked)"
    for name in spies:
        c = read_raw(str(tmp / f"{name}.txt"))
        busy = sum(v for k, v in c.items() if k != idle)
        per_img = 1000 * cpu[name] / max(1.0, images)  # measured CPU (/proc), shared out by py-spy's busy samples
        ms = {k: per_img * v / max(1, busy) for k, v in c.items() if k != idle}
        report["processes"][name] = {"cpu_s": round(cpu[name], 2), "cpu_ms_per_image": round(per_img, 3),
                                     "samples": dict(c.most_common()),
                                     "stage_ms_per_image": {k: round(v, 3) for k, v in ms.items()}}
        print(f"\n{name}: {cpu[name]:.1f} CPU-s in {window:.0f} s = {per_img:.2f} CPU-ms per image")
        for stage, v in sorted(ms.items(), key=lambda kv: -kv[1]):
            print(f"  {100 * v / max(1e-9, per_img):5.1f} %  {v:6.2f} ms/img  {stage}")
    (out_dir / f"serve_profile{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(report, indent=2) + "\n")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

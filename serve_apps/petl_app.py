"""The Ray Serve application: many tasks on one frozen backbone (import path
``serve_apps.petl_app:build_app``; the Serve YAML in ``serve_apps/configs/`` passes ``args`` and
every deployment's replicas, autoscaling, queue limits and batch settings).

    HTTP → Ingress (FastAPI: auth, validation, decode, preprocessing, fan-out and join)
             ├─► TrunkBackbone       linear / DTL tasks: the frozen trunk once per batch for every
             │                       task that shares it (@serve.batch across requests and tasks);
             │                       their heads / side-network tails live here too (co-located:
             │                       shipping k+1 trunk states to another replica copies ~k+1 times
             │                       the image's activations for nothing)
             ├─► EarlyExitRouter     Dyn-* tasks: stage by stage, exited samples leave the batch;
             │                       per-request budget / threshold
             ├─► TokenDispatchRouter DyT tasks: only the dispatcher's active tokens reach the frozen
             │                       MLP, those of every task in the batch in ONE call per layer;
             │                       per-request ratio
             └─► TaskAdapters        LoRA / Adapter / RepAdapter / ARC: @serve.multiplexed by task
Every replica holds the frozen weights once and loads task adapters from the MLflow registry alias
(``models:/<task>@champion``) on demand: LRU-cached, refreshed when the alias moves, refused (503
for that task only) when the adapter's backbone fingerprint differs or it holds NaN/inf.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import defaultdict

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from petl_platform.backbones import SHIPPED, create_backbone
from petl_platform.data import make_transform
from petl_platform.errors import PetlError
from petl_platform.methods import get_method
from petl_platform.methods.base import run_trunk
from petl_platform.methods.dyt.mixed import infer_mixed
from petl_platform.serving import ApiKeys, ServeError, TaskModelCache, answer, decode_image, parse_knobs
from petl_platform.serving.request import parse_tasks
from petl_platform.tracking.settings import CHAMPION, TrackingSettings

log = logging.getLogger("petl.serve")
ROLES = ("trunk", "early_exit", "token_dispatch", "adapter")


def role_of(method: str) -> str:
    if get_method(method).shares_trunk:
        return "trunk"
    if method.startswith("dyn_"):
        return "early_exit"
    return "token_dispatch" if method == "dyt" else "adapter"


def _error(e: ServeError) -> dict:
    return {"error": e.status, "detail": str(e)}


class _Replica:
    """The frozen backbone, once per replica, and the task-model cache on top of it."""

    def __init__(self, backbone: str = SHIPPED, alias: str = CHAMPION, capacity: int = 16, refresh_s: float = 10.0):
        self.backbone = create_backbone(backbone)
        self.cache = TaskModelCache(self.backbone, TrackingSettings.from_env(), alias, capacity, refresh_s)
        self.m_cache = Gauge("petl_adapter_cache", description="adapter cache hits/misses/loads/refused per replica",
                             tag_keys=("kind",))
        self.m_latency = Histogram("petl_task_latency_ms", description="per-task compute latency in the replica",
                                   boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000], tag_keys=("task",))
        self.m_batch = Histogram("petl_batch_size", description="batch sizes formed by the batcher "
                                 "(Serve adds the deployment tag)", boundaries=[1, 2, 4, 8, 16, 32, 64])

    def reconfigure(self, config: dict) -> None:
        """Serve YAML ``user_config``: the batch size and wait timeout of this deployment's batcher."""
        run = getattr(self, "run", None)
        if run is not None and hasattr(run, "set_max_batch_size"):
            run.set_max_batch_size(int(config.get("max_batch_size", 32)))
            run.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    def entry(self, task: str):
        try:
            return self.cache.get(task)
        finally:
            for kind, v in self.cache.stats.items():
                self.m_cache.set(v, tags={"kind": kind})

    def entries(self, tasks) -> tuple[dict, dict]:
        """The cached entry of each distinct task of a batch, and the error of each unavailable one."""
        good, bad = {}, {}
        for t in dict.fromkeys(tasks):
            try:
                good[t] = self.entry(t)
            except ServeError as e:
                bad[t] = _error(e)
        return good, bad


class _TrunkBackbone(_Replica):
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run(self, xs: list[torch.Tensor], tasks: list[list[str]], top_ks: list[int]) -> list[dict]:
        self.m_batch.observe(len(xs))
        entries, bad = self.entries(t for ts in tasks for t in ts)
        out = [{t: bad[t] for t in ts if t in bad} for ts in tasks]
        if not entries:
            return out
        t0 = time.perf_counter()
        x = torch.stack(xs)
        depth = max(e.model.shared_prefix_blocks for e in entries.values())
        with torch.inference_mode():
            states = run_trunk(self.backbone, x, depth)  # once for every sharing task in the batch
            for t, e in entries.items():
                rows = [i for i, ts in enumerate(tasks) if t in ts]
                k = e.model.shared_prefix_blocks
                logits = e.model.forward_tail([s[rows] for s in states[:k + 1]])
                for j, i in enumerate(rows):
                    out[i][t] = answer(logits[j], e.classes, top_ks[i], method=e.method, version=e.version,
                                       exit_stage=None, compute={"gflops": e.gflops, "shared_trunk_blocks": k,
                                                                 "batch_trunk_blocks": depth})
        ms = 1000 * (time.perf_counter() - t0)
        for t in entries:
            self.m_latency.observe(ms, tags={"task": t})
        return out


class _TaskAdapters(_Replica):
    """Per-task adapters + heads that touch every block (LoRA, Adapter, RepAdapter, ARC), multiplexed:
    Serve routes a task's requests to replicas that already hold its adapter."""

    @serve.multiplexed(max_num_models_per_replica=16)
    async def get_model(self, task: str):
        return await asyncio.to_thread(self.entry, task)

    async def predict(self, x: torch.Tensor, top_k: int) -> dict:
        task = serve.get_multiplexed_model_id()
        try:
            await self.get_model(task)
            e = self.entry(task)  # cheap when cached; picks up a moved alias
        except ServeError as err:
            return _error(err)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = e.model(x[None])[0]
        self.m_latency.observe(1000 * (time.perf_counter() - t0), tags={"task": task})
        return answer(logits, e.classes, top_k, method=e.method, version=e.version, exit_stage=None,
                      compute={"gflops": e.gflops, "flops_fraction": 1.0})


class _EarlyExitRouter(_Replica):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.m_exit = Histogram("petl_exit_stage", description="exit stage of each Dyn-* sample",
                                boundaries=[1.5, 2.5, 3.5, 4.5, 5.5, 6.5], tag_keys=("task",))

    def _thresholds(self, e, knobs: dict):
        stages = e.model.stages
        if "threshold" in knobs:
            t = knobs["threshold"]
            if len(t) not in (1, stages - 1):
                raise ServeError(400, f"task {e.task!r} has {stages - 1} early exits: give 1 or {stages - 1} thresholds")
            return tuple(t * (stages - 1) if len(t) == 1 else t)
        if "budget" in knobs:
            return tuple(e.thresholds_for(knobs["budget"]))
        return None  # the thresholds calibrated at training time

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run(self, xs: list[torch.Tensor], tasks: list[str], knobs: list[dict]) -> list[dict]:
        from petl_platform.methods.dyn_exit.calibrate import exit_costs

        self.m_batch.observe(len(xs))
        out: list[dict] = [{} for _ in xs]
        entries, bad = self.entries(tasks)
        groups = defaultdict(list)  # (task, thresholds) -> rows: one predict_dynamic call each
        for i, (t, k) in enumerate(zip(tasks, knobs)):
            try:
                if t in bad:
                    out[i] = bad[t]
                else:
                    groups[(t, self._thresholds(entries[t], k))].append(i)
            except ServeError as err:
                out[i] = _error(err)
        for (t, thr), rows in groups.items():
            e = entries[t]
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = e.model.predict_dynamic(torch.stack([xs[i] for i in rows]), list(thr) if thr else None)
            costs = exit_costs(e.model)
            self.m_latency.observe(1000 * (time.perf_counter() - t0), tags={"task": t})
            for j, i in enumerate(rows):
                stage = int(res["exit_stage"][j])
                self.m_exit.observe(stage, tags={"task": t})
                out[i] = answer(res["logits"][j], e.classes, knobs[i]["top_k"], method=e.method, version=e.version,
                                exit_stage=stage, compute={"gflops": e.gflops * float(costs[stage - 1]),
                                                           "flops_fraction": float(costs[stage - 1]),
                                                           "stages": e.model.stages})
        return out


class _TokenDispatchRouter(_Replica):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.m_rate = Histogram("petl_token_activation_rate", description="DyT measured token activation per batch",
                                boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], tag_keys=("task",))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run(self, xs: list[torch.Tensor], tasks: list[str], knobs: list[dict]) -> list[dict]:
        self.m_batch.observe(len(xs))
        out: list[dict] = [{} for _ in xs]
        cached, bad = self.entries(tasks)
        by_key = defaultdict(list)  # (task, ratio) -> rows
        for i, (t, k) in enumerate(zip(tasks, knobs)):
            if t in bad:
                out[i] = bad[t]
            else:
                by_key[(t, k.get("ratio"))].append(i)
        groups = [(t, ratio, rows) for (t, ratio), rows in by_key.items()]
        entries = [cached[t] for t, _, _ in groups]
        batches = [torch.stack([xs[i] for i in rows]) for _, _, rows in groups]
        t0 = time.perf_counter()
        with torch.inference_mode():
            if all(e.model.config.dispatch == "mlp" for e in entries):
                # every task's active tokens of a layer through ONE frozen MLP call
                answers = infer_mixed([e.model for e in entries], batches, [r for _, r, _ in groups])
            else:
                answers = [e.model.infer(x, ratio=r) for e, x, (_, r, _) in zip(entries, batches, groups)]
        ms = 1000 * (time.perf_counter() - t0)
        for e, (t, _, rows), (logits, info) in zip(entries, groups, answers):
            self.m_latency.observe(ms, tags={"task": t})
            self.m_rate.observe(info["activation_rate"], tags={"task": t})
            per_image = 2 * info["flops"] / len(rows) / 1e9  # multiply-accumulates -> FLOPs
            for j, i in enumerate(rows):
                out[i] = answer(logits[j], e.classes, knobs[i]["top_k"], method=e.method, version=e.version,
                                exit_stage=None, compute={"gflops": per_image, "flops_fraction": info["flops_ratio"],
                                                          "activation_rate": info["activation_rate"]})
        return out


# ------------------------------------------------------------------------------------------ ingress
api = FastAPI(title="petl-platform", description="Many vision tasks on one frozen ViT with PETL adapters.",
              version="0.1.0")


class _Ingress:
    def __init__(self, trunk, adapters, early_exit, token_dispatch, tasks: list[str], backbone: str = SHIPPED,
                 alias: str = CHAMPION, max_body_mb: float = 10.0):
        self.handles = {"trunk": trunk, "adapter": adapters, "early_exit": early_exit, "token_dispatch": token_dispatch}
        self.keys = ApiKeys.from_env()
        self.transform = make_transform(create_backbone(backbone))
        self.alias, self.max_body = alias, int(max_body_mb * 2**20)
        self.settings = TrackingSettings.from_env()
        self.tasks = list(dict.fromkeys(tasks))
        self.catalog = {t: self._describe(t) for t in self.tasks}
        self.m_requests = Counter("petl_requests", description="HTTP requests by status", tag_keys=("status",))

    def _describe(self, task: str) -> dict:
        """Method and classes of the version the alias points at (its adapter_config.json)."""
        from petl_platform.tracking.artifacts import read_adapter_config
        from petl_platform.tracking.runs import fetch_adapter

        try:
            path, info = fetch_adapter(self.settings, f"{task}@{self.alias}")
            cfg = read_adapter_config(path)
            return {"task": task, "method": cfg["method"], "role": role_of(cfg["method"]), "alias": self.alias,
                    "version": info["version"], "classes": cfg.get("classes")}
        except PetlError as e:
            log.error("task %s is unavailable: %s", task, e)
            return {"task": task, "error": str(e)}

    def _reply(self, status: int, body: dict) -> JSONResponse:
        self.m_requests.inc(tags={"status": str(status)})
        return JSONResponse(body, status_code=status)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        ready = [t for t, c in self.catalog.items() if "error" not in c]
        if not ready:
            return self._reply(503, {"status": "no task available", "tasks": self.catalog})
        return {"status": "ready", "tasks": ready}

    @api.get("/v1/tasks")
    async def list_tasks(self, request: Request):
        try:
            self.keys.check(request.headers.get("authorization"))
        except ServeError as e:
            return self._reply(e.status, {"detail": str(e)})
        return {"tasks": list(self.catalog.values())}

    async def _read(self, request: Request) -> tuple[bytes, dict]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("multipart/form-data", "application/json"):
            raise ServeError(415, f"unsupported content type {ctype or 'none'!r}: send multipart/form-data "
                                  "(field 'image') or application/json (base64 'image')")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise ServeError(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ServeError(413, f"request body exceeds the limit of {self.max_body} bytes")
        request._body = body  # for request.form()
        if ctype == "application/json":
            import json

            try:
                fields = json.loads(body or b"null")
                assert isinstance(fields, dict)
            except (ValueError, AssertionError):
                raise ServeError(400, "body is not a JSON object") from None
            try:
                image = base64.b64decode(fields.get("image") or "", validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ServeError(400, "'image' must be base64-encoded image bytes") from None
            return image, fields
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ServeError(400, "multipart body needs a file field 'image'")
        fields = {k: v for k, v in form.items() if k != "image"}
        return await upload.read(), fields

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        t0 = time.perf_counter()
        try:
            self.keys.check(request.headers.get("authorization"))
            image, fields = await self._read(request)
            tasks = parse_tasks(fields.get("tasks"))
            unknown = [t for t in tasks if t not in self.catalog]
            if unknown:
                raise ServeError(404, f"unknown task(s) {', '.join(unknown)}; served tasks: {', '.join(self.tasks)}")
            self.keys.check(request.headers.get("authorization"), tasks)
            down = [t for t in tasks if "error" in self.catalog[t]]
            if down and len(down) == len(tasks):
                raise ServeError(503, f"task(s) unavailable: {'; '.join(self.catalog[t]['error'] for t in down)}")
            knobs = parse_knobs(fields)
            roles = {t: self.catalog[t].get("role") for t in tasks}
            if ("budget" in knobs or "threshold" in knobs) and "early_exit" not in roles.values():
                raise ServeError(400, "budget/threshold apply to early-exit (dyn_*) tasks; none is requested")
            if "ratio" in knobs and "token_dispatch" not in roles.values():
                raise ServeError(400, "ratio applies to token-dispatch (dyt) tasks; none is requested")
            x = decode_image(image, self.transform)
        except ServeError as e:
            return self._reply(e.status, {"detail": str(e)})
        results = await self._fan_out(x, tasks, roles, knobs)
        failed = {t: r for t, r in results.items() if "error" in r}
        body = {"results": results, "latency_ms": round(1000 * (time.perf_counter() - t0), 2)}
        if failed:
            status = max(r["error"] for r in failed.values())
            body["detail"] = "; ".join(r["detail"] for r in failed.values())
            return self._reply(status, body)
        return self._reply(200, body)

    async def _fan_out(self, x, tasks, roles, knobs) -> dict:
        calls = {}
        trunk_tasks = [t for t in tasks if roles[t] == "trunk"]
        if trunk_tasks:
            calls["__trunk__"] = self.handles["trunk"].run.remote(x, trunk_tasks, knobs["top_k"])
        for t in tasks:
            role = roles[t]
            if role is None:
                calls[t] = None
            elif role == "adapter":
                calls[t] = self.handles["adapter"].options(multiplexed_model_id=t).predict.remote(x, knobs["top_k"])
            elif role in ("early_exit", "token_dispatch"):
                calls[t] = self.handles[role].run.remote(x, t, knobs)
        keys = [k for k, c in calls.items() if c is not None]
        done = dict(zip(keys, await asyncio.gather(*(calls[k] for k in keys), return_exceptions=True)))
        results = {}
        for t in tasks:
            got = done.get("__trunk__" if roles[t] == "trunk" else t)
            if roles[t] is None:
                results[t] = {"error": 503, "detail": f"task {t!r} is unavailable: {self.catalog[t]['error']}"}
            elif isinstance(got, BaseException):  # e.g. the replica died mid-request: retryable
                log.warning("task %s failed downstream: %s", t, got)
                results[t] = {"error": 503, "detail": f"task {t!r}: the serving replica failed; retry "
                                                      f"({type(got).__name__})"}
            else:
                results[t] = dict(got[t]) if roles[t] == "trunk" else got
            results[t]["task"] = t
        return results


# Deployments wrap module-level classes, so Ray pickles the classes by reference (importable on
# every worker: serve_apps is installed with the project) rather than by value.
TrunkBackbone = serve.deployment(name="TrunkBackbone")(_TrunkBackbone)
TaskAdapters = serve.deployment(name="TaskAdapters")(_TaskAdapters)
EarlyExitRouter = serve.deployment(name="EarlyExitRouter")(_EarlyExitRouter)
TokenDispatchRouter = serve.deployment(name="TokenDispatchRouter")(_TokenDispatchRouter)
Ingress = serve.deployment(name="Ingress")(serve.ingress(api)(_Ingress))


def build_app(args: dict):
    """Serve app builder (``import_path: serve_apps.petl_app:build_app``). ``args``: ``tasks``
    (list or comma string), ``backbone``, ``alias``, ``capacity``, ``refresh_s``, ``max_body_mb``;
    ``deployment_options`` (the YAML's ``deployments`` list) when built in-process rather than by
    ``serve run``/``serve deploy``, which apply that list themselves."""
    tasks = parse_tasks(args.get("tasks", ""))
    cpu = {"ray_actor_options": {"num_cpus": float(args.get("num_cpus_per_replica", 0.25))}}
    opts = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in args.get("deployment_options") or []}

    def bind(dep, *a, **kw):
        return dep.options(**{**cpu, **opts.get(dep.name, {})}).bind(*a, **kw)

    common = {"backbone": args.get("backbone", SHIPPED), "alias": args.get("alias", CHAMPION),
              "capacity": int(args.get("capacity", 16)), "refresh_s": float(args.get("refresh_s", 10.0))}
    roles = [bind(d, **common) for d in (TrunkBackbone, TaskAdapters, EarlyExitRouter, TokenDispatchRouter)]
    return bind(Ingress, *roles, tasks=tasks, backbone=common["backbone"], alias=common["alias"],
                max_body_mb=float(args.get("max_body_mb", 10.0)))


def load_config(path: str, tasks: list[str] | None = None, port: int | None = None) -> dict:
    """The Serve YAML with optional overrides: ``{"http_options", "app": {name, route_prefix, args}}``."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    app = dict(cfg["applications"][0])
    args = {**app.get("args", {}), "deployment_options": app.get("deployments", [])}
    if tasks:
        args["tasks"] = tasks
    http = {**cfg.get("http_options", {}), **({"port": port} if port else {})}
    return {"http_options": http, "name": app.get("name", "petl"), "route_prefix": app.get("route_prefix", "/"),
            "args": args}


def run_local(path: str, tasks: list[str] | None = None, port: int | None = None) -> str:
    """Deploy the config on the current (or a new local) Ray cluster; returns the base URL."""
    from petl_platform.training.distributed import ensure_ray

    c = load_config(path, tasks, port)
    ensure_ray()
    serve.start(http_options=c["http_options"])
    serve.run(build_app(c["args"]), name=c["name"], route_prefix=c["route_prefix"])
    return f"http://{c['http_options'].get('host', '127.0.0.1')}:{c['http_options'].get('port', 8000)}"

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
             └─► TaskAdapters        LoRA / Adapter / RepAdapter / ARC: the frozen ops once for the
                                     batch, each row's own task deltas
Which deployment serves a task follows the runtime its method declares (``MethodSpec.runtime``).
Every deployment answers its whole batch (requests x tasks) with one call of the mixed-task engine
(``petl_platform.inference.Engine``), on the GPU when the replica has one (``num_gpus`` in the
Serve YAML; ``dtype: bf16`` for half precision). Every replica holds the frozen weights once and
loads task adapters from the MLflow registry alias
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
from petl_platform.inference import Engine, Row
from petl_platform.methods import get_method
from petl_platform.methods.registry import spec_of
from petl_platform.serving import ApiKeys, ServeError, TaskModelCache, answer, decode_image, parse_knobs
from petl_platform.serving.models import describe
from petl_platform.serving.request import MAX_PIXELS, parse_tasks
from petl_platform.tracking.settings import CHAMPION, TrackingSettings

log = logging.getLogger("petl.serve")
ROLES = ("trunk", "early_exit", "token_dispatch", "adapter")


# the deployment that serves each runtime a method declares in its MethodSpec
ROLE_OF_RUNTIME = {"shared_trunk": "trunk", "per_row_adapter": "adapter", "early_exit": "early_exit",
                   "token_dispatch": "token_dispatch"}
DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def role_of(method: str) -> str:
    return ROLE_OF_RUNTIME[get_method(method).runtime]


def _error(e: ServeError) -> dict:
    """The JSON body of an error: status and a one-line message, never an object address."""
    from petl_platform.serving.request import safe_text

    return {"error": e.status, "detail": safe_text(str(e), 2000)}


class _Replica:
    """The frozen backbone once per replica (on the GPU when the replica has one), the task-model
    cache on top of it, and the mixed-task engine that answers a whole batch in one pass. Every
    deployment batches across requests AND tasks with ``@serve.batch``: each request carries its
    task ids as data (``@serve.multiplexed`` would split batches per task)."""

    def __init__(self, backbone: str = SHIPPED, alias: str = CHAMPION, capacity: int = 16, refresh_s: float = 10.0,
                 dtype: str | None = None):
        if dtype not in DTYPES:
            raise PetlError(f"dtype must be one of fp32, bf16, fp16; got {dtype!r}")
        self.backbone = create_backbone(backbone)
        device = "cuda" if torch.cuda.is_available() else None  # a replica with num_gpus sees its GPU
        self.engine = Engine(self.backbone, device=device, dtype=DTYPES[dtype])
        self.cache = TaskModelCache(self.backbone, TrackingSettings.from_env(), alias, capacity, refresh_s)
        self.m_cache = Gauge("petl_adapter_cache", description="adapter cache hits/misses/loads/refused per replica",
                             tag_keys=("kind",))
        self.m_latency = Histogram("petl_task_latency_ms", description="per-task compute latency in the replica",
                                   boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000], tag_keys=("task",))
        self.m_batch = Histogram("petl_batch_size", description="batch sizes formed by the batcher "
                                 "(Serve adds the deployment tag)", boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.m_exit = Histogram("petl_exit_stage", description="exit stage of each Dyn-* sample",
                                boundaries=[1.5, 2.5, 3.5, 4.5, 5.5, 6.5], tag_keys=("task",))
        self.m_rate = Histogram("petl_token_activation_rate", description="DyT measured token activation per batch",
                                boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], tag_keys=("task",))

    def reconfigure(self, config: dict) -> None:
        """Serve YAML ``user_config``: the batch size and wait timeout of this deployment's batcher."""
        self.run.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.run.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    def entries(self, tasks) -> tuple[dict, dict]:
        """The cached entry of each distinct task of a batch, and the error of each unavailable one."""
        good, bad = {}, {}
        try:
            for t in dict.fromkeys(tasks):
                try:
                    good[t] = self.cache.get(t)
                except ServeError as e:
                    bad[t] = _error(e)
        finally:
            for kind, v in self.cache.stats.items():
                self.m_cache.set(v, tags={"kind": kind})
        return good, bad

    @staticmethod
    def row_knobs(e, knobs: dict) -> dict:
        """The engine's knobs for one task of a request: Dyn-* thresholds (from ``threshold`` or a
        ``budget``), DyT's ``ratio``; other tasks take none."""
        runtime = spec_of(e.model).runtime
        if runtime == "token_dispatch":
            return {"ratio": knobs["ratio"]} if knobs.get("ratio") is not None else {}
        if runtime != "early_exit":
            return {}
        exits = e.model.stages - 1
        if "threshold" in knobs:
            t = list(knobs["threshold"])
            if len(t) not in (1, exits):
                raise ServeError(400, f"task {e.task!r} has {exits} early exits: give 1 or {exits} thresholds")
            return {"thresholds": t * exits if len(t) == 1 else t}
        if "budget" in knobs:
            return {"thresholds": list(e.thresholds_for(knobs["budget"]))}
        return {}  # the thresholds calibrated at training time

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run(self, xs: list[torch.Tensor], tasks: list[list[str]], knobs: list[dict]) -> list[dict]:
        """Per request: ``{task: answer or error}`` for its tasks; the whole batch, every task and
        method in it, is one engine call."""
        self.m_batch.observe(len(xs))
        entries, bad = await asyncio.to_thread(self.entries, [t for ts in tasks for t in ts])
        out = [{t: bad[t] for t in ts if t in bad} for ts in tasks]
        rows = []
        for i, (ts, k) in enumerate(zip(tasks, knobs)):
            for t in dict.fromkeys(ts):
                if t in entries:
                    try:
                        rows.append(Row(i, t, self.row_knobs(entries[t], k)))
                    except ServeError as err:
                        out[i][t] = _error(err)
        if not rows:
            return out
        t0 = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.engine.run, torch.stack(xs), rows,
                                              {t: e.model for t, e in entries.items()})
        except PetlError as err:  # a request the engine refuses (e.g. a knob that does not fit)
            for r in rows:
                out[r.image][r.task] = _error(ServeError(400, f"task {r.task!r}: {err}"))
            return out
        ms = 1000 * (time.perf_counter() - t0)
        for t in dict.fromkeys(r.task for r in rows):
            self.m_latency.observe(ms, tags={"task": t})
        for r, res in zip(rows, results):
            e = entries[r.task]
            if res.exit_stage is not None:
                self.m_exit.observe(res.exit_stage, tags={"task": r.task})
            if "activation_rate" in res.compute:
                self.m_rate.observe(res.compute["activation_rate"], tags={"task": r.task})
            out[r.image][r.task] = answer(res.logits, e.classes, knobs[r.image]["top_k"], method=e.method,
                                          version=e.version, exit_stage=res.exit_stage, compute=res.compute)
        return out


class _TrunkBackbone(_Replica):
    """Linear / DTL tasks: the frozen trunk once per batch for every task that shares it; their
    heads / side-network tails live here too (co-located: shipping k+1 trunk states to another
    replica copies ~k+1 times the image's activations for nothing)."""


class _TaskAdapters(_Replica):
    """LoRA / Adapter / RepAdapter / ARC tasks: frozen ops once for the batch, each row's own deltas."""


class _EarlyExitRouter(_Replica):
    """Dyn-* tasks: stage by stage, rows leave at their exit, the rest continue together across
    tasks; per-request budget / threshold."""


class _TokenDispatchRouter(_Replica):
    """DyT tasks: the active tokens of every task in the batch through ONE frozen MLP call per layer;
    per-request ratio."""


# ------------------------------------------------------------------------------------------ ingress
api = FastAPI(title="petl-platform", description="Many vision tasks on one frozen ViT with PETL adapters.",
              version="0.1.0")


class _Ingress:
    def __init__(self, trunk, adapters, early_exit, token_dispatch, tasks: list[str], backbone: str = SHIPPED,
                 alias: str = CHAMPION, max_body_mb: float = 10.0, max_pixels: int = MAX_PIXELS):
        self.max_pixels = int(max_pixels)  # decoded size limit, checked from the image header first
        self.handles = {"trunk": trunk, "adapter": adapters, "early_exit": early_exit, "token_dispatch": token_dispatch}
        self.keys = ApiKeys.from_env()
        self.transform = make_transform(create_backbone(backbone))
        self.alias, self.max_body = alias, int(max_body_mb * 2**20)
        self.settings = TrackingSettings.from_env()
        self.tasks = list(dict.fromkeys(tasks))
        self.catalog = {t: self._describe(t) for t in self.tasks}
        self.m_requests = Counter("petl_requests", description="HTTP requests by status", tag_keys=("status",))

    def _describe(self, task: str) -> dict:
        """Method, classes and deployment of the version the alias points at (its adapter_config.json)."""
        row = describe(self.settings, task, self.alias)
        if "method" in row:
            row["role"] = role_of(row["method"])
        return row

    def _reply(self, status: int, body: dict) -> JSONResponse:
        self.m_requests.inc(tags={"status": str(status)})
        # a 503 is retryable (replica lost, task loading, overload): say when to come back
        return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        """For probes, without a key: counts only, no task names or errors."""
        ready = sum("error" not in c for c in self.catalog.values())
        counts = {"tasks_ready": ready, "tasks_total": len(self.catalog)}
        if not ready:
            return self._reply(503, {"status": "no task available", **counts})
        return {"status": "ready", **counts}

    @api.get("/v1/tasks")
    async def list_tasks(self, request: Request):
        try:
            key = self.keys.check(request.headers.get("authorization"))
        except ServeError as e:
            return self._reply(e.status, _error(e))
        return {"tasks": [self.catalog[t] for t in self.keys.visible(key, self.tasks)]}  # only the key's own

    async def _read(self, request: Request) -> tuple[bytes, dict]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("multipart/form-data", "application/json"):
            raise ServeError(415, f"unsupported content type {ctype[:80] or 'none'!r}: send multipart/form-data "
                                  "(field 'image') or application/json (base64 'image')")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise ServeError(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ServeError(413, f"request body exceeds the limit of {self.max_body} bytes")
        request._body = bytes(body)  # for request.form()
        if ctype == "application/json":
            import json

            try:
                fields = json.loads(request._body or b"null")
            except (ValueError, RecursionError):  # RecursionError: nesting like [[[[...]]]]
                raise ServeError(400, "body is not valid JSON") from None
            if not isinstance(fields, dict):
                raise ServeError(400, f"body must be a JSON object, got a JSON {type(fields).__name__}")
            image = fields.get("image") or ""
            if isinstance(image, str) and image.startswith("data:") and ";base64," in image[:100]:
                image = image.split(";base64,", 1)[1]  # a data URL
            try:
                image = base64.b64decode(image, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ServeError(400, "'image' must be base64-encoded image bytes") from None
            return image, fields
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ServeError(400, "multipart body needs a file field 'image'")
        fields = {k: v for k, v in form.items() if k != "image"}
        if len(form.getlist("tasks")) > 1:  # tasks=a&tasks=b as well as tasks=a,b
            fields["tasks"] = [t for t in form.getlist("tasks") if isinstance(t, str)] or None
        return await upload.read(), fields

    @api.post("/v1/predict")
    async def predict(self, request: Request):
        """Every failure is a JSON error with a status: a ServeError's own, a malformed multipart body's
        400, and for anything unexpected a logged 503 with a reference, never a 500 or a traceback."""
        from starlette.exceptions import HTTPException
        from starlette.requests import ClientDisconnect

        from petl_platform.serving.request import safe_text

        t0 = time.perf_counter()
        auth = request.headers.get("authorization")
        try:
            key = self.keys.check(auth)
            image, fields = await self._read(request)
            tasks = parse_tasks(fields.get("tasks"))
            self.keys.check(auth, tasks)  # 403 before 404: a restricted key learns no other task's name
            unknown = [t for t in tasks if t not in self.catalog]
            if unknown:
                mine = self.keys.visible(key, self.tasks)
                raise ServeError(404, f"unknown task(s) {', '.join(unknown)}; tasks this key may use: "
                                      f"{', '.join(mine) or 'none'}")
            down = [t for t in tasks if "error" in self.catalog[t]]
            if down and len(down) == len(tasks):
                raise ServeError(503, f"task(s) unavailable: {'; '.join(self.catalog[t]['error'] for t in down)}")
            knobs = parse_knobs(fields)
            roles = {t: self.catalog[t].get("role") for t in tasks}
            if ("budget" in knobs or "threshold" in knobs) and "early_exit" not in roles.values():
                raise ServeError(400, "budget/threshold apply to early-exit (dyn_*) tasks; none is requested")
            if "ratio" in knobs and "token_dispatch" not in roles.values():
                raise ServeError(400, "ratio applies to token-dispatch (dyt) tasks; none is requested")
            # off the event loop: a large image takes a replica's CPU for a while
            x = await asyncio.to_thread(decode_image, image, self.transform, self.max_pixels)
            results = await self._fan_out(x, tasks, roles, knobs)
        except ServeError as e:
            return self._reply(e.status, _error(e))
        except HTTPException as e:  # Starlette's own 400 for a malformed multipart body
            return self._reply(e.status_code, {"error": e.status_code, "detail": safe_text(e.detail)})
        except ClientDisconnect:
            return self._reply(400, {"error": 400, "detail": "the client closed the connection mid-body"})
        except Exception as e:  # noqa: BLE001 - a bug or a backend fault: logged in full, the client gets a 503
            ref = f"{time.time_ns():x}"
            log.exception("predict failed (ref %s): %s", ref, type(e).__name__)
            reply = self._reply(503, {"error": 503, "detail": f"internal error (ref {ref}); retry later"})
            reply.headers["Retry-After"] = "1"
            return reply
        failed = {t: r for t, r in results.items() if "error" in r}
        body = {"results": results, "latency_ms": round(1000 * (time.perf_counter() - t0), 2)}
        if failed:
            status = max(r["error"] for r in failed.values())
            body["detail"] = "; ".join(r["detail"] for r in failed.values())
            return self._reply(status, body)
        return self._reply(200, body)

    async def _fan_out(self, x, tasks, roles, knobs) -> dict:
        """One call per deployment with all of this request's tasks for it (the task ids travel as
        data, so the deployment's batch mixes tasks and requests)."""
        by_role: dict[str, list[str]] = defaultdict(list)
        for t in tasks:
            if roles[t] is not None:
                by_role[roles[t]].append(t)
        keys = list(by_role)
        got = await asyncio.gather(*(self.handles[r].run.remote(x, by_role[r], knobs) for r in keys),
                                   return_exceptions=True)
        done = dict(zip(keys, got))
        results = {}
        for t in tasks:
            reply = done.get(roles[t])
            if roles[t] is None:
                results[t] = {"error": 503, "detail": f"task {t!r} is unavailable: {self.catalog[t]['error']}"}
            elif isinstance(reply, BaseException):  # e.g. the replica died mid-request: retryable
                log.warning("task %s failed downstream: %s", t, reply)
                results[t] = {"error": 503, "detail": f"task {t!r}: the serving replica failed; retry "
                                                      f"({type(reply).__name__})"}
            else:
                results[t] = dict(reply[t])
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
    (list or comma string), ``backbone``, ``alias``, ``capacity``, ``refresh_s``, ``max_body_mb``,
    ``dtype`` (fp32 | bf16 | fp16, the replicas' inference precision);
    ``deployment_options`` (the YAML's ``deployments`` list) when built in-process rather than by
    ``serve run``/``serve deploy``, which apply that list themselves."""
    tasks = parse_tasks(args.get("tasks", ""), limit=None)
    cpu = {"ray_actor_options": {"num_cpus": float(args.get("num_cpus_per_replica", 0.25))}}
    opts = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in args.get("deployment_options") or []}

    def bind(dep, *a, **kw):
        return dep.options(**{**cpu, **opts.get(dep.name, {})}).bind(*a, **kw)

    common = {"backbone": args.get("backbone", SHIPPED), "alias": args.get("alias", CHAMPION),
              "capacity": int(args.get("capacity", 16)), "refresh_s": float(args.get("refresh_s", 10.0))}
    roles = [bind(d, **common, dtype=args.get("dtype")) for d in (TrunkBackbone, TaskAdapters, EarlyExitRouter,
                                                                  TokenDispatchRouter)]
    return bind(Ingress, *roles, tasks=tasks, backbone=common["backbone"], alias=common["alias"],
                max_body_mb=float(args.get("max_body_mb", 10.0)), max_pixels=int(args.get("max_pixels", MAX_PIXELS)))


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


PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve_apps.proxy_errors:middlewares")


def use_proxy_middleware() -> None:
    """A local cluster started after this inherits the env var that puts ``proxy_errors`` in Serve's
    HTTP proxy (a dead Ingress replica's requests: JSON 503 + Retry-After, not a plain 500)."""
    import os

    os.environ.setdefault(*PROXY_CALLBACK)


def run_local(path: str, tasks: list[str] | None = None, port: int | None = None) -> str:
    """Deploy the config on the current (or a new local) Ray cluster; returns the base URL."""
    from petl_platform.training.distributed import ensure_ray

    c = load_config(path, tasks, port)
    use_proxy_middleware()
    ensure_ray()
    serve.start(http_options=c["http_options"])
    serve.run(build_app(c["args"]), name=c["name"], route_prefix=c["route_prefix"])
    return f"http://{c['http_options'].get('host', '127.0.0.1')}:{c['http_options'].get('port', 8000)}"

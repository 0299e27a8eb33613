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
loads task adapters from the MLflow registry alias (``models:/<task>@champion``) on demand, off the
event loop, into a byte-budgeted LRU store (``serving/models.py``); alias moves are prefetched in
the background and swap in once loaded; an adapter whose backbone fingerprint differs or that holds
NaN/inf is refused (503 for that task only). The servable tasks are every model registered with the
alias (``serving/catalog.py``): a task registered after the deploy answers on its first request.
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
from petl_platform.inference import Row
from petl_platform.methods.registry import spec_of
from petl_platform.serving import ApiKeys, ServeError, Stack, answer, decode_image, parse_knobs
from petl_platform.serving.catalog import Catalog
from petl_platform.serving.request import MAX_PIXELS, parse_tasks
from petl_platform.tracking.settings import CHAMPION, TrackingSettings

log = logging.getLogger("petl.serve")
ROLES = ("trunk", "early_exit", "token_dispatch", "adapter")


# the deployment that serves each runtime a method declares in its MethodSpec
ROLE_OF_RUNTIME = {"shared_trunk": "trunk", "per_row_adapter": "adapter", "early_exit": "early_exit",
                   "token_dispatch": "token_dispatch"}


def _error(e: ServeError) -> dict:
    """The JSON body of an error: status and a one-line message, never an object address."""
    from petl_platform.serving.request import safe_text

    return {"error": e.status, "detail": safe_text(str(e), 2000)}


class _Replica:
    """The frozen backbone once per replica (on the GPU when the replica has one), the adapter store
    on top of it, and the mixed-task engine that answers a whole batch in one pass. Every
    deployment batches across requests AND tasks with ``@serve.batch``: each request carries its
    task ids as data (``@serve.multiplexed`` would split batches per task). A request whose task is
    cold waits for that load before it joins a batch, so batches of loaded tasks never wait on it."""

    role = ""

    def __init__(self, backbone: str = SHIPPED, alias: str = CHAMPION, capacity: int | None = None,
                 refresh_s: float = 10.0, dtype: str | None = None, capacity_mb: float = 256.0,
                 host_mb: float | None = None, load_timeout_s: float = 30.0, warm: list[str] | None = None):
        stack = Stack.build(backbone, dtype=dtype)  # a replica with num_gpus sees its GPU: the engine runs there
        self.backbone, self.engine = stack.backbone, stack.engine
        self.cache = stack.store(TrackingSettings.from_env(), alias, capacity=capacity, refresh_s=refresh_s,
                                 capacity_mb=capacity_mb, host_mb=host_mb, load_timeout_s=load_timeout_s)
        self.m_cache = Gauge("petl_adapter_store", description="adapter store per replica: resident tasks and bytes, "
                             "loads, evictions, hits, misses, refused", tag_keys=("kind",))
        self.m_load = Histogram("petl_adapter_load_ms", description="cold load time of a task adapter",
                                boundaries=[10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 30000])
        self.m_latency = Histogram("petl_task_latency_ms", description="per-task compute latency in the replica",
                                   boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000], tag_keys=("task",))
        self.m_batch = Histogram("petl_batch_size", description="batch sizes formed by the batcher "
                                 "(Serve adds the deployment tag)", boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.m_exit = Histogram("petl_exit_stage", description="exit stage of each Dyn-* sample",
                                boundaries=[1.5, 2.5, 3.5, 4.5, 5.5, 6.5], tag_keys=("task",))
        self.m_rate = Histogram("petl_token_activation_rate", description="DyT measured token activation per batch",
                                boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], tag_keys=("task",))
        self._loads_seen = 0
        self.warm_up(warm or [])
        self.cache.start()  # the alias refresh, on its own thread from now on

    def warm_up(self, tasks: list[str]) -> None:
        """Load the named tasks this deployment serves and run each once, before the replica reports
        ready: the first request is then as fast as the next. A task that cannot load is logged."""
        mine = {}
        for t in tasks:
            try:
                e = self.cache.get(t)
            except ServeError as err:
                log.warning("warm-up: task %s not loaded: %s", t, err)
                continue
            if ROLE_OF_RUNTIME[spec_of(e.model).runtime] == self.role:
                mine[t] = e
            else:
                self.cache.drop(t)  # another deployment serves it
        if mine:
            x = torch.zeros(1, 3, *self.engine.image_size)
            self.engine.run(x, [Row(0, t) for t in mine], {t: e.model for t, e in mine.items()})
        log.info("%s warm: %d of %d named tasks", type(self).__name__, len(mine), len(tasks))

    def reconfigure(self, config: dict) -> None:
        """Serve YAML ``user_config``: the batch size and wait timeout of this deployment's batcher."""
        self._batch.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self._batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    def _metrics(self) -> None:
        snap = self.cache.snapshot()
        for kind in ("resident", "resident_bytes", "host_resident", "host_bytes", "loads", "evictions", "hits",
                     "misses", "refused", "refreshes", "load_timeouts"):
            self.m_cache.set(snap[kind], tags={"kind": kind})
        for ms in self.cache.load_ms[len(self.cache.load_ms) - max(0, snap["loads"] - self._loads_seen):]:
            self.m_load.observe(ms)
        self._loads_seen = snap["loads"]

    @staticmethod
    def row_knobs(e, knobs: dict) -> dict:
        """The engine's knobs for one task of a request: Dyn-* thresholds (from ``threshold`` or a
        ``budget``, by the curve stored in the adapter), DyT's ``ratio``; other tasks take none."""
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

    async def run(self, x: torch.Tensor, tasks: list[str], knobs: dict) -> dict:
        """``{task: answer or error}`` for one request: its cold tasks load first (off the event
        loop, never holding up other requests), then the request joins the mixed-task batch."""
        cold = [t for t in dict.fromkeys(tasks) if self.cache.resident(t) is None]
        bad = {}
        if cold:
            got = await asyncio.gather(*(self.cache.aget(t) for t in cold), return_exceptions=True)
            for t, g in zip(cold, got):
                if isinstance(g, ServeError):
                    bad[t] = _error(g)
                elif isinstance(g, BaseException):
                    raise g
        ready = [t for t in tasks if t not in bad]
        out = await self._batch(x, ready, knobs) if ready else {}
        self._metrics()
        return {**out, **bad}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batch(self, xs: list[torch.Tensor], tasks: list[list[str]], knobs: list[dict]) -> list[dict]:
        """Per request: ``{task: answer or error}`` for its tasks; the whole batch, every task and
        method in it, is one engine call."""
        self.m_batch.observe(len(xs))
        entries, out = {}, [{} for _ in tasks]
        for t in dict.fromkeys(t for ts in tasks for t in ts):
            e = self.cache.resident(t)
            if e is None:  # evicted since its request checked: rare, load it again
                try:
                    e = await self.cache.aget(t)
                except ServeError as err:
                    for i, ts in enumerate(tasks):
                        if t in ts:
                            out[i][t] = _error(err)
                    continue
            entries[t] = e
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
            with self.cache.pinned(entries.values()):
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

    role = "trunk"


class _TaskAdapters(_Replica):
    """LoRA / Adapter / RepAdapter / ARC tasks: frozen ops once for the batch, each row's own deltas."""

    role = "adapter"


class _EarlyExitRouter(_Replica):
    """Dyn-* tasks: stage by stage, rows leave at their exit, the rest continue together across
    tasks; per-request budget / threshold."""

    role = "early_exit"


class _TokenDispatchRouter(_Replica):
    """DyT tasks: the active tokens of every task in the batch through ONE frozen MLP call per layer;
    per-request ratio."""

    role = "token_dispatch"


# ------------------------------------------------------------------------------------------ ingress
api = FastAPI(title="petl-platform", description="Many vision tasks on one frozen ViT with PETL adapters.",
              version="0.1.0")


class _Ingress:
    """Auth, validation, decode and fan-out. The catalog of servable tasks is the registry itself
    (every model with the alias, narrowed by ``task_pattern`` / ``task_tag``), re-read in the
    background; a task registered since is looked up on its first request."""

    def __init__(self, trunk, adapters, early_exit, token_dispatch, tasks: list[str] | None = None,
                 backbone: str = SHIPPED, alias: str = CHAMPION, max_body_mb: float = 10.0,
                 max_pixels: int = MAX_PIXELS, task_pattern: str | None = None, task_tag: str | None = None,
                 refresh_s: float = 10.0, lookup_timeout_s: float = 10.0):
        self.max_pixels = int(max_pixels)  # decoded size limit, checked from the image header first
        self.handles = {"trunk": trunk, "adapter": adapters, "early_exit": early_exit, "token_dispatch": token_dispatch}
        self.keys = ApiKeys.from_env()
        self.transform = make_transform(create_backbone(backbone))
        self.alias, self.max_body, self.lookup_timeout_s = alias, int(max_body_mb * 2**20), lookup_timeout_s
        self.settings = TrackingSettings.from_env()
        self.named = list(dict.fromkeys(tasks or []))  # warmed up by the replicas; served like any other
        self.catalog = Catalog(self.settings, alias, task_pattern, task_tag, refresh_s)
        self.catalog.start()
        if not self.catalog.wait_ready(lookup_timeout_s):  # a hung registry: start anyway, serve what loads
            log.warning("the model registry did not answer within %.0f s; the catalog fills in once it does",
                        lookup_timeout_s)
        self.m_requests = Counter("petl_requests", description="HTTP requests by status", tag_keys=("status",))

    async def _rows(self, tasks: list[str], fresh: bool = False) -> dict[str, dict | None]:
        """Each task's catalog row (its role from the method of the version the alias points at),
        ``None`` for a task that is not registered with the alias. Tasks the catalog does not list
        yet, or every task when ``fresh``, are looked up off the event loop, with a time limit."""
        rows = {t: None if fresh else self.catalog.rows.get(t) for t in tasks}
        missing = [t for t, r in rows.items() if r is None]
        if missing:
            try:
                found = await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(self.catalog.lookup, t, fresh)
                                                                for t in missing)), self.lookup_timeout_s)
            except (asyncio.TimeoutError, PetlError) as e:
                log.warning("task lookup failed: %s", e)
                raise ServeError(503, "the model registry did not answer; retry later") from None
            rows.update(zip(missing, found))
        for r in rows.values():
            if r is not None and "runtime" in r:
                r.setdefault("role", ROLE_OF_RUNTIME[r["runtime"]])
        return rows

    def _reply(self, status: int, body: dict) -> JSONResponse:
        self.m_requests.inc(tags={"status": str(status)})
        # a 503 is retryable (replica lost, task loading, overload): say when to come back
        return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        """For probes, without a key: counts only, no task names, errors or URIs."""
        rows = list(self.catalog.rows.values())
        ready = sum("error" not in c for c in rows)
        counts = {"tasks_ready": ready, "tasks_total": len(rows)}
        if not ready:
            return self._reply(503, {"status": "no task available", **counts})
        return {"status": "ready", **counts}

    @api.get("/v1/tasks")
    async def list_tasks(self, request: Request):
        try:
            key = self.keys.check(request.headers.get("authorization"))
        except ServeError as e:
            return self._reply(e.status, _error(e))
        rows = self.catalog.rows
        return {"tasks": [rows[t] for t in self.keys.visible(key, sorted(rows))]}  # only the key's own

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
            rows = await self._rows(tasks)
            unknown = [t for t in tasks if rows[t] is None]
            if unknown:
                mine = self.keys.visible(key, sorted(self.catalog.rows))
                listed = ", ".join(mine[:20]) + (f" and {len(mine) - 20} more (GET /v1/tasks)" if len(mine) > 20 else "")
                raise ServeError(404, f"unknown task(s) {', '.join(unknown)}: not registered with alias "
                                      f"{self.alias!r}; tasks this key may use: {listed or 'none'}")
            down = [t for t in tasks if "error" in rows[t]]
            if down and len(down) == len(tasks):
                raise ServeError(503, f"task(s) unavailable: {'; '.join(rows[t]['error'] for t in down)}")
            knobs = parse_knobs(fields)
            roles = {t: rows[t].get("role") for t in tasks}
            if _knob_misfit(knobs, roles):  # before a 400, the registry's current answer: the alias may
                rows = await self._rows(tasks, fresh=True)  # have moved to another method since the refresh
                if any(rows[t] is None for t in tasks):
                    raise ServeError(404, f"task(s) {', '.join(t for t in tasks if rows[t] is None)} no "
                                          f"longer registered with alias {self.alias!r}")
                roles = {t: rows[t].get("role") for t in tasks}
                if misfit := _knob_misfit(knobs, roles):
                    raise ServeError(400, misfit)
            # off the event loop: a large image takes a replica's CPU for a while
            x = await asyncio.to_thread(decode_image, image, self.transform, self.max_pixels)
            results = await self._fan_out(x, tasks, roles, knobs, rows)
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

    async def _fan_out(self, x, tasks, roles, knobs, rows) -> dict:
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
                results[t] = {"error": 503, "detail": f"task {t!r} is unavailable: {rows[t]['error']}"}
            elif isinstance(reply, BaseException):  # e.g. the replica died mid-request: retryable
                log.warning("task %s failed downstream: %s", t, reply)
                results[t] = {"error": 503, "detail": f"task {t!r}: the serving replica failed; retry "
                                                      f"({type(reply).__name__})"}
            else:
                results[t] = dict(reply[t])
            results[t]["task"] = t
        return results


def _knob_misfit(knobs: dict, roles: dict) -> str | None:
    """Why a per-request knob applies to none of the requested tasks; ``None`` when each fits one."""
    if ("budget" in knobs or "threshold" in knobs) and "early_exit" not in roles.values():
        return "budget/threshold apply to early-exit (dyn_*) tasks; none is requested"
    if "ratio" in knobs and "token_dispatch" not in roles.values():
        return "ratio applies to token-dispatch (dyt) tasks; none is requested"
    return None


# Deployments wrap module-level classes, so Ray pickles the classes by reference (importable on
# every worker: serve_apps is installed with the project) rather than by value.
TrunkBackbone = serve.deployment(name="TrunkBackbone")(_TrunkBackbone)
TaskAdapters = serve.deployment(name="TaskAdapters")(_TaskAdapters)
EarlyExitRouter = serve.deployment(name="EarlyExitRouter")(_EarlyExitRouter)
TokenDispatchRouter = serve.deployment(name="TokenDispatchRouter")(_TokenDispatchRouter)
Ingress = serve.deployment(name="Ingress")(serve.ingress(api)(_Ingress))


def build_app(args: dict):
    """Serve app builder (``import_path: serve_apps.petl_app:build_app``). ``args``:

    - ``tasks`` (list or comma string, optional): loaded and warmed up before the replicas report
      ready. Every other task registered with the alias is served on demand, no redeploy needed;
    - ``task_pattern`` (fnmatch, e.g. ``"team-a-*"``) and ``task_tag`` (``KEY=VALUE`` on the
      registered model) narrow what is servable;
    - ``backbone``, ``alias``, ``refresh_s`` (how often the catalog and the aliases are re-read, in
      the background), ``max_body_mb``, ``max_pixels``, ``dtype`` (fp32 | bf16 | fp16);
    - the adapter store of each replica: ``capacity_mb`` (LRU budget on the device), ``host_mb``
      (behind a GPU, in host memory), ``capacity`` (optional cap on resident tasks),
      ``load_timeout_s`` (a request for a cold task waits at most this long, then gets a 503);
    - ``deployment_options`` (the YAML's ``deployments`` list) when built in-process rather than by
      ``serve run``/``serve deploy``, which apply that list themselves."""
    tasks = parse_tasks(args["tasks"], limit=None) if args.get("tasks") else []
    cpu = {"ray_actor_options": {"num_cpus": float(args.get("num_cpus_per_replica", 0.25))}}
    opts = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in args.get("deployment_options") or []}

    def bind(dep, *a, **kw):
        return dep.options(**{**cpu, **opts.get(dep.name, {})}).bind(*a, **kw)

    def opt(key, cast):
        return cast(args[key]) if args.get(key) is not None else None

    common = {"backbone": args.get("backbone", SHIPPED), "alias": args.get("alias", CHAMPION),
              "refresh_s": float(args.get("refresh_s", 10.0))}
    store = {"capacity": opt("capacity", int), "capacity_mb": float(args.get("capacity_mb", 256.0)),
             "host_mb": opt("host_mb", float), "load_timeout_s": float(args.get("load_timeout_s", 30.0))}
    roles = [bind(d, **common, **store, dtype=args.get("dtype"), warm=tasks)
             for d in (TrunkBackbone, TaskAdapters, EarlyExitRouter, TokenDispatchRouter)]
    return bind(Ingress, *roles, tasks=tasks, **common, max_body_mb=float(args.get("max_body_mb", 10.0)),
                max_pixels=int(args.get("max_pixels", MAX_PIXELS)), task_pattern=args.get("task_pattern"),
                task_tag=args.get("task_tag"))


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


def run_local(path: str, tasks: list[str] | None = None, port: int | None = None, *, host: str | None = None,
              args_overrides: dict | None = None, quiet: bool = False) -> str:
    """The one Serve launcher (``petl serve``, ``petl demo``): deploy the config at ``path`` on the
    current (or a new local) Ray cluster; returns the base URL. ``tasks``, ``port`` and ``host``
    override the config's; ``args_overrides`` its app ``args`` (e.g. ``{"backbone": ...}``).
    Ray's own output (controller, proxy, replicas, the driver's Serve INFO lines) goes to the Ray
    session's log files, not the terminal: ``serving_logs_dir()`` says where. ``quiet``: those
    files too get WARNING and up only, and no access log (``petl demo``). The proxy's error
    middleware is set for a cluster started here (``use_proxy_middleware``)."""
    from petl_platform.cluster.connect import ensure_ray

    c = load_config(path, tasks, port)
    http = {**c["http_options"], **({"host": host} if host else {})}
    use_proxy_middleware()
    ensure_ray(log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's own Serve INFO lines
    quiet_logs = {"logging_config": {"log_level": "WARNING", "enable_access_log": False}} if quiet else {}
    serve.start(http_options=http, **quiet_logs)
    serve.run(build_app({**c["args"], **(args_overrides or {})}), name=c["name"], route_prefix=c["route_prefix"])
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"


def serving_logs_dir() -> str | None:
    """The Ray session's Serve log folder on this node (replicas, proxy, controller), or None."""
    import os

    import ray

    try:
        return os.path.join(ray._private.worker.global_worker.node.get_logs_dir_path(), "serve")
    except Exception:  # noqa: BLE001 - a private Ray API: the hint is optional
        return None

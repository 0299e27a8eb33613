"""The HTTP front of the Serve app (FastAPI, ``/healthz``, ``/readyz``, ``/v1/tasks``,
``/v1/predict``): API keys, body limits and validation, image decode and preprocessing, the catalog
of servable tasks, then one call per deployment (``serve_apps/deployments.py``) with all of a
request's tasks for it, and the join of their answers. Every failure is a JSON error with a status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import defaultdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter

from petl_platform.backbones import SHIPPED, create_backbone
from petl_platform.data import make_transform
from petl_platform.errors import PetlError
from petl_platform.serving import ApiKeys, ServeError, decode_image, parse_knobs
from petl_platform.serving.catalog import Catalog
from petl_platform.serving.request import MAX_PIXELS, parse_tasks
from petl_platform.tracking.settings import CHAMPION, TrackingSettings

from serve_apps.deployments import ROLE_OF_RUNTIME, error_body

log = logging.getLogger("petl.serve")

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
            return self._reply(e.status, error_body(e))
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
            return self._reply(e.status, error_body(e))
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


# a module-level class, pickled by reference (see deployments.py)
Ingress = serve.deployment(name="Ingress")(serve.ingress(api)(_Ingress))

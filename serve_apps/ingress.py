"""The HTTP front of the Serve app (FastAPI): ``/healthz``, ``/readyz``, ``/v1/tasks``,
``/v1/predict`` (one or many images, many tasks) and the Open Inference Protocol v2 (``/v2/...``:
one task, many images, encoded or raw ``UINT8`` pixels, JSON or binary tensors). API keys, body
and image limits, validation, image decode (to ``uint8`` at the model's size, off the event loop),
the catalog of servable tasks, then one call per deployment (``serve_apps/deployments.py``) with
all of a request's images and tasks for it, and the join of their answers. Every failure is a JSON
error with a status, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections import defaultdict

import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.metrics import Counter

from petl_platform.backbones import SHIPPED, create_backbone
from petl_platform.data import Pixels
from petl_platform.errors import PetlError
from petl_platform.serving import ApiKeys, ServeError, oip, parse_knobs
from petl_platform.serving.catalog import Catalog
from petl_platform.serving.request import (MAX_IMAGES, MAX_PIXELS, MAX_REQUEST_PIXELS, decode_many, parse_tasks,
                                           safe_text)
from petl_platform.tracking.settings import CHAMPION, TrackingSettings
from petl_platform.version import __version__

from serve_apps.deployments import ROLE_OF_RUNTIME, error_body

log = logging.getLogger("petl.serve")
_ANY_TYPE = None  # OIP bodies: JSON or JSON + binary tensors, under any content type
# the OIP request body in /docs (read by oip.parse_infer: it may carry binary tensors after the JSON)
_OIP_SCHEMA = oip.InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_OIP_DEFS = _OIP_SCHEMA.pop("$defs", {})
_OIP_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "JSON header (Inference-Header-Content-Length bytes), then raw tensors"}}}}}

class PredictJSON(BaseModel):
    """``POST /v1/predict`` as JSON (multipart takes the same fields; ``image`` repeated for many).
    Validated field by field in the route, with the messages and statuses the bad-input corpus pins."""

    image: str | None = Field(None, description="one image: base64 bytes or a data: URL")
    images: list[str] | None = Field(None, description="many images (base64), answered as a list", max_length=64)
    tasks: list[str] | str = Field(..., description="task names, or one comma-separated string (at most 64)")
    top_k: int | None = Field(3, ge=1, le=1000)
    budget: float | None = Field(None, gt=0, le=1, description="Dyn-* tasks: FLOPs fraction")
    threshold: float | list[float] | str | None = Field(None, description="Dyn-* tasks: exit confidence(s)")
    ratio: float | None = Field(None, gt=0, le=1, description="DyT tasks: token activation ratio")


_V1_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/PredictJSON"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}, "tasks": {"type": "string"}}}}}}}

api = FastAPI(title="petl-platform", description="Many vision tasks on one frozen ViT with PETL adapters: "
              "/v1 (one image, many tasks) and the Open Inference Protocol v2 (/v2).", version=__version__)


def _openapi() -> dict:
    """FastAPI's schema, plus the OIP request models (the infer route reads its body itself: it may
    hold binary tensors after the JSON, which FastAPI's own body parsing cannot take)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            {**_OIP_DEFS, "InferRequest": _OIP_SCHEMA, "PredictJSON": PredictJSON.model_json_schema()})
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


class _Ingress:
    """Auth, validation, decode and fan-out. The catalog of servable tasks is the registry itself
    (every model with the alias, narrowed by ``task_pattern`` / ``task_tag``), re-read in the
    background; a task registered since is looked up on its first request."""

    def __init__(self, trunk, adapters, early_exit, token_dispatch, tasks: list[str] | None = None,
                 backbone: str = SHIPPED, alias: str = CHAMPION, max_body_mb: float = 10.0,
                 max_pixels: int = MAX_PIXELS, task_pattern: str | None = None, task_tag: str | None = None,
                 refresh_s: float = 10.0, lookup_timeout_s: float = 10.0, max_images: int = MAX_IMAGES,
                 max_request_pixels: int = MAX_REQUEST_PIXELS):
        self.max_pixels = int(max_pixels)  # decoded size limit, checked from the image header first
        self.max_images, self.max_request_pixels = int(max_images), int(max_request_pixels)
        self.handles = {"trunk": trunk, "adapter": adapters, "early_exit": early_exit, "token_dispatch": token_dispatch}
        self.keys = ApiKeys.from_env()
        self.pixels = Pixels.of(create_backbone(backbone))  # decoded images travel as uint8 at the model's size
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

    async def _body(self, request: Request, kinds: tuple[str, ...] | None) -> tuple[str, bytes]:
        """The content type (one of ``kinds``, else 415; any when None) and the body, read under the
        size limit (413)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kinds is not None and ctype not in kinds:
            raise ServeError(415, f"unsupported content type {ctype[:80] or 'none'!r}: send " + " or ".join(kinds))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise ServeError(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ServeError(413, f"request body exceeds the limit of {self.max_body} bytes")
        return ctype, bytes(body)

    def _count(self, n: int) -> None:
        if n > self.max_images:
            raise ServeError(413, f"{n} images in one request; the limit is {self.max_images} per request")

    async def _read(self, request: Request) -> tuple[list[bytes], bool, dict]:
        """The request's encoded images, whether it sent a list (``images``, or repeated multipart
        ``image`` fields: the answer is then a list too), and its other fields."""
        ctype, raw = await self._body(request, ("multipart/form-data", "application/json"))
        request._body = raw  # for request.form()
        if ctype == "application/json":
            import json

            try:
                fields = json.loads(raw or b"null")
            except (ValueError, RecursionError):  # RecursionError: nesting like [[[[...]]]]
                raise ServeError(400, "body is not valid JSON") from None
            if not isinstance(fields, dict):
                raise ServeError(400, f"body must be a JSON object, got a JSON {type(fields).__name__}")
            if "images" in fields:
                if "image" in fields:
                    raise ServeError(400, "give 'image' (one) or 'images' (a list), not both")
                items = fields["images"]
                if not isinstance(items, list) or not items:
                    raise ServeError(400, "'images' must be a non-empty list of base64-encoded images")
                self._count(len(items))
                return [_b64(v, f"'images'[{i}]") for i, v in enumerate(items)], True, fields
            return [_b64(fields.get("image") or "", "'image'")], False, fields
        form = await request.form()
        uploads = form.getlist("image")
        if not uploads or any(isinstance(u, str) for u in uploads):
            raise ServeError(400, "multipart body needs a file field 'image' (repeat it for many images)")
        self._count(len(uploads))
        fields = {k: v for k, v in form.items() if k != "image"}
        if len(form.getlist("tasks")) > 1:  # tasks=a&tasks=b as well as tasks=a,b
            fields["tasks"] = [t for t in form.getlist("tasks") if isinstance(t, str)] or None
        return [await u.read() for u in uploads], len(uploads) > 1, fields

    @api.post("/v1/predict", openapi_extra=_V1_BODY)
    async def predict(self, request: Request):
        """Every failure is a JSON error with a status: a ServeError's own, a malformed multipart body's
        400, and for anything unexpected a logged 503 with a reference, never a 500 or a traceback."""
        from petl_platform.serving.request import safe_text
        from starlette.exceptions import HTTPException
        from starlette.requests import ClientDisconnect

        t0 = time.perf_counter()
        auth = request.headers.get("authorization")
        try:
            key = self.keys.check(auth)
            images, many, fields = await self._read(request)
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
            # off the event loop (Pillow's decoders and resize release the GIL): uint8 at the model's size
            x = await asyncio.to_thread(decode_many, images, self.pixels, self.max_pixels, self.max_request_pixels)
            per_image = await self._fan_out(x, tasks, roles, knobs, rows)
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
        failed = {}
        for results in per_image:
            failed.update({t: r for t, r in results.items() if "error" in r})
        body = {"results": per_image if many else per_image[0], "latency_ms": round(1000 * (time.perf_counter() - t0), 2)}
        if failed:
            status = max(r["error"] for r in failed.values())
            body["detail"] = "; ".join(r["detail"] for r in failed.values())
            return self._reply(status, body)
        return self._reply(200, body)

    # ------------------------------------------------------------------ Open Inference Protocol v2
    # The KServe / Triton REST protocol (tritonclient, the kserve SDK): one task per call (a
    # "model"), many images per call, encoded (BYTES) or raw pixels (UINT8), in JSON or in the binary
    # tensor extension. The same API keys, catalog, limits and 4xx rules as /v1.

    def _oip_error(self, e: ServeError) -> Response:
        status, body, headers = oip.error_response(e)
        self.m_requests.inc(tags={"status": str(status)})
        if status == 503:
            headers = {**headers, "Retry-After": "1"}
        return Response(body, status_code=status, headers=headers)

    async def _oip_row(self, request: Request, task: str, version: str | None) -> dict:
        """The catalog row of ``task`` for this key: 401/403 for the key, 404 for a task the alias
        does not name (the same order as /v1: a restricted key learns no other task's name) or for
        a ``version`` other than the one served."""
        auth = request.headers.get("authorization")
        self.keys.check(auth)
        self.keys.check(auth, parse_tasks([task]))
        row = (await self._rows([task]))[task]
        if row is None:
            raise ServeError(404, f"unknown model {safe_text(task, 200)!r}: not registered with alias {self.alias!r}")
        if version is not None and version != str(row.get("version")):
            raise ServeError(404, f"model {task!r} serves version {row.get('version')} (alias {self.alias!r}); "
                                  f"version {safe_text(version, 40)!r} is not served")
        return row

    @api.get("/v2")
    async def oip_server(self):
        return {"name": "petl-platform", "version": __version__, "extensions": ["binary_tensor_data"]}

    @api.get("/v2/health/live")
    async def oip_live(self):
        return {"live": True}

    @api.get("/v2/health/ready")
    async def oip_ready(self):
        ready = any("error" not in r for r in self.catalog.rows.values())
        return Response(json.dumps({"ready": ready}), status_code=200 if ready else 503,
                        media_type="application/json")

    @api.get("/v2/models/{task}", response_model=oip.ModelMetadata, response_model_exclude_none=True)
    @api.get("/v2/models/{task}/versions/{version}", response_model=oip.ModelMetadata,
             response_model_exclude_none=True, include_in_schema=False)
    async def oip_metadata(self, task: str, request: Request, version: str | None = None):
        try:
            row = await self._oip_row(request, task, version)
        except ServeError as e:
            return self._oip_error(e)
        return oip.model_metadata(task, row, self.pixels.image_size)

    @api.get("/v2/models/{task}/ready")
    @api.get("/v2/models/{task}/versions/{version}/ready", include_in_schema=False)
    async def oip_model_ready(self, task: str, request: Request, version: str | None = None):
        try:
            row = await self._oip_row(request, task, version)
        except ServeError as e:
            return self._oip_error(e)
        ready = "error" not in row
        return Response(json.dumps({"name": task, "ready": ready}), status_code=200 if ready else 503,
                        media_type="application/json", headers=None if ready else {"Retry-After": "1"})

    def _parse_oip(self, raw: bytes, headers) -> oip.InferCall:
        raw = oip.inflate(raw, headers.get("content-encoding"), self.max_body)
        return oip.parse_infer(raw, headers.get(oip.HEADER), max_images=self.max_images,
                               max_pixels=self.max_request_pixels)

    @api.post("/v2/models/{task}/infer", openapi_extra=_OIP_BODY, response_model=oip.InferResponse,
              response_model_exclude_none=True)
    @api.post("/v2/models/{task}/versions/{version}/infer", openapi_extra=_OIP_BODY, include_in_schema=False)
    async def oip_infer(self, task: str, request: Request, version: str | None = None):
        """OIP inference: every image of the call for ``task``; knobs as request ``parameters``."""
        try:
            row = await self._oip_row(request, task, version)
            if "error" in row:
                raise ServeError(503, f"model {task!r} is unavailable: {row['error']}")
            _, raw = await self._body(request, _ANY_TYPE)
            call = await asyncio.to_thread(self._parse_oip, raw, request.headers)  # a JSON body may be MBs
            knobs = {**parse_knobs(call.params), "probabilities": True}
            roles = {task: row.get("role")}
            if misfit := _knob_misfit(knobs, roles):
                raise ServeError(400, misfit)
            if call.encoded is not None:
                x = await asyncio.to_thread(decode_many, call.encoded, self.pixels, self.max_pixels,
                                            self.max_request_pixels)
            else:
                x = await asyncio.to_thread(lambda: torch.stack([self.pixels.from_array(a) for a in call.pixels]))
            answers = [a[task] for a in await self._fan_out(x, [task], roles, knobs, {task: row})]
            failed = next((a for a in answers if "error" in a), None)
            if failed is not None:
                raise ServeError(failed["error"], failed["detail"])
            body, headers = oip.infer_response(task, str(answers[0].get("version", row.get("version"))), answers,
                                               None, call)
        except ServeError as e:
            return self._oip_error(e)
        except Exception as e:  # noqa: BLE001 - a bug or a backend fault: logged, the client gets a 503
            ref = f"{time.time_ns():x}"
            log.exception("OIP infer failed (ref %s): %s", ref, type(e).__name__)
            return self._oip_error(ServeError(503, f"internal error (ref {ref}); retry later"))
        self.m_requests.inc(tags={"status": "200"})
        return Response(body, status_code=200, headers=headers)

    async def _fan_out(self, x, tasks, roles, knobs, rows) -> list[dict]:
        """Per image of ``x`` (uint8 ``[N, 3, H, W]``), ``{task: answer or error}``: one call per
        deployment with all of this request's images and tasks for it (the task ids travel as data,
        so the deployment's batch mixes tasks and requests)."""
        from ray.serve.exceptions import BackPressureError

        by_role: dict[str, list[str]] = defaultdict(list)
        for t in tasks:
            if roles[t] is not None:
                by_role[roles[t]].append(t)
        keys = list(by_role)
        # each task's version travels with it: the deployment serves the version it was routed by
        # (or the registry's answer when the two disagree), never a cache's stale alias
        got = await asyncio.gather(*(self.handles[r].run.remote(x, by_role[r], knobs,
                                                                {t: rows[t].get("version") for t in by_role[r]})
                                     for r in keys), return_exceptions=True)
        done = dict(zip(keys, got))
        results = [{} for _ in range(len(x))]
        for t in tasks:
            reply = done.get(roles[t])
            if roles[t] is None:
                failed = {"error": 503, "detail": f"task {t!r} is unavailable: {rows[t]['error']}"}
            elif isinstance(reply, BackPressureError):  # the deployment's queue is full: come back shortly
                failed = {"error": 503, "detail": f"task {t!r}: the server is at capacity; retry shortly"}
            elif isinstance(reply, BaseException):  # e.g. the replica died mid-request: retryable
                log.warning("task %s failed downstream: %s", t, reply)
                failed = {"error": 503, "detail": f"task {t!r}: the serving replica failed; retry "
                                                  f"({type(reply).__name__})"}
            else:
                failed = None
            for n in range(len(x)):
                results[n][t] = {**(failed or reply[n][t]), "task": t}
        return results


def _b64(value, what: str) -> bytes:
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value[:100]:
        value = value.split(";base64,", 1)[1]  # a data URL
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ServeError(400, f"{what} must be base64-encoded image bytes") from None


def _knob_misfit(knobs: dict, roles: dict) -> str | None:
    """Why a per-request knob applies to none of the requested tasks; ``None`` when each fits one."""
    if ("budget" in knobs or "threshold" in knobs) and "early_exit" not in roles.values():
        return "budget/threshold apply to early-exit (dyn_*) tasks; none is requested"
    if "ratio" in knobs and "token_dispatch" not in roles.values():
        return "ratio applies to token-dispatch (dyt) tasks; none is requested"
    return None


# a module-level class, pickled by reference (see deployments.py)
Ingress = serve.deployment(name="Ingress")(serve.ingress(api)(_Ingress))

"""Per-replica store of task models: adapters loaded from the MLflow registry alias
(``models:/<task>@champion``) onto the replica's one frozen backbone.

- **A load is a fetch, then an admit.** ``fetch(ref) -> Fetched`` reads a version's config and flat
  tensors: from the registry and S3 in this process by default, from the node's object store in a
  Serve replica (``serve_apps/node_adapters.py``: the download and deserialization run in a per-node
  actor, once per node). ``admit(task, fetched)`` makes the task model: in a replica
  (``Stack.admit``) a slot of the engine's adapter bank for per-row methods, no module built.
- **Capacity in bytes.** The store keeps adapters under a budget in MB (``capacity_mb``) on the
  replica's device, evicting by ``policy`` (``lru``, or ``lfu``: fewest lookups first, aged). On a
  GPU replica, module-tree adapters evicted from the device wait in host memory (``host_mb``).
- **Loads never block the loaded tasks.** A cold task is fetched and admitted on a small pool of
  loader threads with no lock held; requests for tasks already resident never wait on it. A
  registry or artifact store that hangs delays only the task being loaded (its callers get a 503
  with Retry-After after ``load_timeout_s``).
- **Alias moves are prefetched.** A background thread checks every ``refresh_s`` whether the alias of
  a resident task moved; the new version is loaded beside the old one, and swaps in once loaded
  (a refused version leaves the old one serving). No request ever waits on the check.
- An adapter for another backbone fingerprint, or holding NaN/inf, is refused: the task is reported
  unavailable (503) and the other tasks are unaffected. Downloaded files are deleted as soon as
  their tensors are read.

Dyn-* tasks carry their FLOPs budget -> thresholds curve in the artifact (calibrated on val at
training time), so serving never needs a task's data."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import NotFoundError, PetlError
from ..inference.engine import measured_gflops
from ..tracking.artifacts import model_from_state, read_adapter
from ..tracking.runs import fetch_adapter, show_model
from ..tracking.settings import CHAMPION, TrackingSettings
from .request import ServeError

log = logging.getLogger(__name__)
MB = 2**20
# eviction: "lru" (least recently used first) or "lfu" (fewest lookups first, counts halved every
# AGE_EVERY lookups so a task that was hot once does not stay forever; ties: least recently used)
POLICIES = ("lru", "lfu")
AGE_EVERY = 4096


@dataclass
class Fetched:
    """One adapter version as a replica receives it: its ``adapter_config.json`` and its flat
    tensors (CPU), with where they came from: ``"s3"`` (the registry's artifact store) or
    ``"node"`` (the node's object store, filled once by a per-node fetcher; see
    ``serve_apps/node_adapters.py``)."""

    version: int
    config: dict
    state: dict
    source: str = "s3"
    fetch_ms: float = 0.0


class AdapterRefused(PetlError):
    """An adapter version that was found but cannot be served (unreadable, NaN, another backbone)."""

    def __init__(self, version: int, message: str):
        super().__init__(message)
        self.version = version


def fetch_from_registry(settings: TrackingSettings, ref: str, fingerprint: str | None = None,
                        backbone_name: str = "?") -> Fetched:
    """``ref``'s adapter (``task@alias`` or ``task/version``) from the registry and its artifact store,
    read into flat tensors; the downloaded files are deleted at once. 404 / 503 ``ServeError`` as
    ``fetched``; ``AdapterRefused`` for a version that cannot be served."""
    t0 = time.perf_counter()
    with fetched(settings, ref) as (path, info):
        try:
            cfg, state = read_adapter(path, fingerprint, backbone_name)
        except PetlError as e:
            raise AdapterRefused(info["version"], str(e).replace(str(path), ref)) from None
    return Fetched(info["version"], cfg, state, "s3", 1000 * (time.perf_counter() - t0))


@dataclass
class TaskEntry:
    task: str
    model: torch.nn.Module
    version: int
    method: str
    classes: list[str]
    gflops: float  # measured full-forward GFLOPs per image
    nbytes: int = 0  # the task's own tensors (adapter + head), not the shared backbone
    load_ms: float = 0.0
    source: str = "s3"  # where its tensors came from: "s3" or "node" (the node's object store)
    pins: int = 0  # batches running this entry right now: it is not moved off the device meanwhile

    @property
    def budget_thresholds(self) -> dict[float, list[float]]:
        return dict(getattr(self.model, "budget_thresholds", None) or {})

    def info(self) -> dict:
        return {"task": self.task, "method": self.method, "version": self.version, "classes": self.classes,
                "gflops_per_image": round(self.gflops, 6), "budgets": sorted(self.budget_thresholds),
                "bytes": self.nbytes}

    def thresholds_for(self, budget: float) -> list[float]:
        """The thresholds of the curve stored in the adapter for ``budget``; 400 when it has none."""
        from ..methods.registry import spec_of

        exits = spec_of(self.model).exits
        try:
            if exits is None:
                raise PetlError(f"a FLOPs budget applies to early-exit methods (dyn_*), not {self.method!r}")
            return exits.thresholds_for_budget(self.budget_thresholds, budget)
        except PetlError as e:
            raise ServeError(400, f"task {self.task!r} (version {self.version}): {e}") from None


def own_tensors(model: torch.nn.Module, backbone: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of ``model`` that are not the shared backbone's."""
    shared = {id(t) for t in (*backbone.parameters(), *backbone.buffers())}
    seen, out = set(), []
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in shared and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def move_own(model: torch.nn.Module, backbone: torch.nn.Module, device) -> None:
    """Move only the task's own tensors (``model.to`` would move the shared backbone too)."""
    for t in own_tensors(model, backbone):
        t.data = t.data.to(device, non_blocking=True)


class TaskModelCache:
    """See the module docstring. ``capacity`` optionally caps the number of resident tasks as well.
    ``prepare(task, model) -> gflops`` readies a loaded model on the replica (the engine's check,
    device move and FLOP count); by default the model is moved to the backbone's device and dtype
    and its FLOPs measured here."""

    def __init__(self, backbone, settings: TrackingSettings, alias: str = CHAMPION, capacity: int | None = None,
                 refresh_s: float = 10.0, capacity_mb: float = 256.0, host_mb: float | None = None,
                 load_timeout_s: float = 30.0, load_workers: int = 2,
                 prepare: Callable[[str, torch.nn.Module], float] | None = None, background: bool = False,
                 fetch: Callable[[str], Fetched] | None = None,
                 admit: Callable[[str, Fetched], tuple[object, float]] | None = None, policy: str = "lru"):
        if capacity_mb <= 0 or (capacity is not None and capacity < 1):
            raise PetlError("the adapter store needs capacity_mb > 0 (and capacity >= 1 when given)")
        if policy not in POLICIES:
            raise PetlError(f"the adapter store's eviction policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.policy = policy
        self.freq: dict[str, float] = {}  # lookups per task, resident or not, halved every AGE_EVERY lookups
        self._lookups = 0
        self.backbone, self.settings, self.alias = backbone, settings, alias
        self.capacity, self.refresh_s, self.load_timeout_s = capacity, refresh_s, load_timeout_s
        frozen = next(backbone.parameters())
        self.device, self.dtype = frozen.device, frozen.dtype
        self.budget = int(capacity_mb * MB)
        # host memory behind the device: only where the device is not the host already
        self.host_budget = int((host_mb if host_mb is not None else (4 * capacity_mb if self.device.type != "cpu"
                                                                      else 0)) * MB)
        self.entries: OrderedDict[str, TaskEntry] = OrderedDict()  # on the device, LRU order
        self.host: OrderedDict[str, TaskEntry] = OrderedDict()  # evicted from the device, kept on the host
        self.loading: dict[str, cf.Future] = {}
        self.unavailable: dict[str, tuple[ServeError, float, int | None]] = {}  # error, when, refused version
        # (task, version a request was routed by) -> (the version a check served then, when): ``current``
        self._checked: dict[tuple[str, int], tuple[int, float]] = {}
        self.stats = {"hits": 0, "misses": 0, "loads": 0, "refused": 0, "evictions": 0, "refreshes": 0,
                      "host_hits": 0, "load_timeouts": 0, "loads_s3": 0, "loads_node": 0, "rechecks": 0}
        self.load_ms: list[float] = []  # the last 256 loads
        self.load_sources: list[str] = []  # where each of them came from ("s3" or "node"), in step with load_ms
        self._prepare = prepare or self._default_prepare
        fp = getattr(backbone, "fingerprint", None)
        # where a version's tensors come from (the registry and S3 by default; a node's object store
        # through ``serve_apps/node_adapters.py``), and what makes a task model of them (by default a
        # module tree on the backbone, readied by ``prepare``; the engine's banks in a replica)
        name = str(getattr(backbone, "petl_name", "?"))
        self._fetch = fetch or (lambda ref: fetch_from_registry(self.settings, ref, fp, name))
        self._admit = admit or self._default_admit
        self._lock = threading.Lock()  # held for bookkeeping only, never across a load or a registry call
        self._pool = cf.ThreadPoolExecutor(load_workers, thread_name_prefix="petl-load")
        self._stop = threading.Event()
        self._refresher = None
        if background:
            self.start()

    # ------------------------------------------------------------------ lookups
    def resident(self, task: str) -> TaskEntry | None:
        """The task's entry when it is resident (promoted from host memory if it waits there)."""
        with self._lock:
            self._count(task)
            entry = self.entries.get(task)
            if entry is not None:
                self.entries.move_to_end(task)
                self.stats["hits"] += 1
                return entry
            entry = self.host.pop(task, None)
            if entry is None:
                return None
            move_own(entry.model, self.backbone, self.device)
            self.entries[task] = entry
            self.stats["hits"] += 1
            self.stats["host_hits"] += 1
            self._evict()
            return entry

    def current(self, task: str, version: int | None = None) -> TaskEntry | None:
        """The resident entry when it serves a request that was routed by ``version`` (the version
        the caller's catalog saw; None: any): the same version, or the one a check for this version
        served within the last ``refresh_s`` (the caller's catalog was stale, or the registry or the
        new version failed). None when the task must be loaded or checked first (``aget``)."""
        entry = self.resident(task)
        if entry is None or version is None or entry.version == version:
            return entry
        with self._lock:
            seen = self._checked.get((task, int(version)))
        if seen is not None and seen[0] == entry.version and time.monotonic() - seen[1] < self.refresh_s:
            return entry
        return None

    def load(self, task: str, version: int | None = None) -> cf.Future:
        """A future of the task's entry: done at once when ``current``, else the (shared) load. A
        cold task loads ``version`` when given (the one the request was routed by: its method is the
        one the caller chose a deployment for), else the version the alias points at. A resident
        task at another version than ``version`` is checked against the registry now: one of the
        two has missed an alias move, and the registry's answer is served."""
        entry = self.current(task, version)
        with self._lock:
            if entry is not None:
                fut = cf.Future()
                fut.set_result(entry)
                return fut
            fut = self.loading.get(task)
            if fut is not None:
                return fut
            held = self.entries.get(task) or self.host.get(task)
            if held is not None:  # resident at another version than the request's
                fut = self.loading[task] = self._pool.submit(self._recheck_job, task, int(version), held)
                return fut
            self.stats["misses"] += 1
            failed = self.unavailable.get(task)
            if failed and time.monotonic() - failed[1] < self.refresh_s:
                fut = cf.Future()
                fut.set_exception(failed[0])
                return fut
            ref = f"{task}@{self.alias}" if version is None else f"{task}/{int(version)}"
            fut = self.loading[task] = self._pool.submit(self._load_job, task, ref)
            return fut

    def is_resident(self, task: str) -> bool:
        """Whether ``task`` is on the device now (a peek: no lookup is counted, nothing moves)."""
        return task in self.entries

    def prefetch(self, task: str) -> cf.Future | None:
        """Start loading ``task`` if it is neither resident nor loading (a queued request's task,
        before it reaches a batch); the load's future, or None when resident."""
        with self._lock:
            if task in self.entries:
                return None
            fut = self.loading.get(task)
        return fut if fut is not None else self.load(task)

    def get(self, task: str, timeout: float | None = None, version: int | None = None) -> TaskEntry:
        """The task's entry, loading it if needed (blocking; ``aget`` in async code)."""
        try:
            return self.load(task, version).result(self.load_timeout_s if timeout is None else timeout)
        except cf.TimeoutError:
            raise self._timed_out(task) from None

    async def aget(self, task: str, timeout: float | None = None, version: int | None = None) -> TaskEntry:
        """``get`` for the event loop: waits on the load without blocking the loop or other tasks.
        ``version``: the version the request was routed by (see ``load``)."""
        entry = self.current(task, version)
        if entry is not None:
            return entry
        fut = asyncio.wrap_future(self.load(task, version))
        try:  # shield: a caller that gives up must not cancel the load others wait on
            return await asyncio.wait_for(asyncio.shield(fut), self.load_timeout_s if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise self._timed_out(task) from None

    def _timed_out(self, task: str) -> ServeError:
        self.stats["load_timeouts"] += 1
        return ServeError(503, f"task {task!r} is still loading (the model registry or artifact store is slow); "
                               "retry shortly")

    @contextmanager
    def pinned(self, entries):
        """Keep ``entries`` on the device while a batch runs them."""
        with self._lock:
            for e in entries:
                e.pins += 1
        try:
            yield
        finally:
            with self._lock:
                for e in entries:
                    e.pins -= 1

    def drop(self, task: str) -> None:
        with self._lock:
            self.entries.pop(task, None)
            self.host.pop(task, None)

    # ------------------------------------------------------------------ loading
    def _default_prepare(self, task: str, model) -> float:
        model.to(device=self.device, dtype=self.dtype)  # the backbone is there already: a no-op for it
        return measured_gflops(model, self.backbone.patch_embed.img_size, self.device, self.dtype)

    def _default_admit(self, task: str, got: Fetched) -> tuple[object, float]:
        model = model_from_state(got.config, got.state, self.backbone, source=f"{task} v{got.version}")
        return model, self._prepare(task, model)

    def _recheck_job(self, task: str, version: int, held: TaskEntry) -> TaskEntry:
        """A request routed by ``version`` found ``held`` at another one: the version the alias
        names now is served (loaded by number: never through a cache's alias). What was served is
        remembered for ``refresh_s``, so the requests of a stale catalog do not ask again, and a
        registry that is down or a new version that is refused (``held`` keeps serving) is not
        asked again per request."""
        served = held
        try:
            with self._lock:
                self.stats["rechecks"] += 1
            try:
                now = int(show_model(self.settings, f"{task}@{self.alias}")["version"])
            except PetlError as e:
                log.warning("alias check for %s failed (serving v%s): %s", task, held.version, e)
                return held
            if now != held.version:
                try:
                    served = self._load_job(task, f"{task}/{now}", tracked=False)
                except ServeError as e:
                    log.error("task %s: version %s refused, still serving v%s: %s", task, now, held.version, e)
            return served
        finally:
            with self._lock:
                self._checked[(task, version)] = (served.version, time.monotonic())
                while len(self._checked) > 4096:
                    self._checked.pop(next(iter(self._checked)))
                self.loading.pop(task, None)

    def _load_job(self, task: str, ref: str, tracked: bool = True) -> TaskEntry:
        """Fetch, build and ready one version, with no lock held; then insert it (or record why not).
        ``tracked``: started by ``load`` (its future is ``loading[task]``), not by a refresh."""
        t0 = time.perf_counter()
        version = None
        try:
            try:
                got = self._fetch(ref)
                version = got.version
                have = got.config.get("backbone_fingerprint")
                if have != getattr(self.backbone, "fingerprint", have):  # a fetcher that did not check it
                    raise AdapterRefused(version, f"adapter {ref} was trained on backbone {got.config.get('backbone')!r} "
                                                  f"with fingerprint {have}, but the given backbone "
                                                  f"{getattr(self.backbone, 'petl_name', '?')!r} has fingerprint "
                                                  f"{self.backbone.fingerprint}")
                model, gflops = self._admit(task, got)
            except AdapterRefused as e:
                version = e.version
                raise ServeError(503, f"task {task!r} is unavailable: version {version} refused: "
                                      f"{self._client_safe(str(e), '', ref)}") from None
            except ServeError:
                raise
            except PetlError as e:
                if version is None:
                    raise
                raise ServeError(503, f"task {task!r} is unavailable: version {version} refused: "
                                      f"{self._client_safe(str(e), '', ref)}") from None
        except ServeError as e:
            with self._lock:
                if tracked:
                    self.loading.pop(task, None)
                if e.status == 503 and version is not None:
                    self.stats["refused"] += 1
                    self.unavailable[task] = (e, time.monotonic(), version)
            raise
        except BaseException:
            if tracked:
                with self._lock:
                    self.loading.pop(task, None)
            raise
        classes = list(model.classes or [str(i) for i in range(model.num_classes)])  # set by load_adapter
        nbytes = getattr(model, "nbytes", None)  # a banked task: its slot's bytes
        if nbytes is None:
            nbytes = sum(t.numel() * t.element_size() for t in own_tensors(model, self.backbone))
        ms = 1000 * (time.perf_counter() - t0)
        entry = TaskEntry(task, model, version, model.method, classes, gflops, nbytes, ms, got.source)
        with self._lock:
            old = self.entries.get(task) or self.host.get(task)
            if old is None or old.version != version:
                if old is not None:
                    self.stats["refreshes"] += 1
                self.host.pop(task, None)
                self.entries[task] = entry  # a swap: batches already running keep the old model
                self.entries.move_to_end(task)
            else:
                entry = old
            self.unavailable.pop(task, None)
            if tracked:
                self.loading.pop(task, None)
            self.stats["loads"] += 1
            self.stats["loads_node" if got.source == "node" else "loads_s3"] += 1
            self.load_ms = [*self.load_ms[-255:], ms]
            self.load_sources = [*self.load_sources[-255:], got.source]
            self._evict(keep=task)
        return entry

    def _count(self, task: str) -> None:
        self.freq[task] = self.freq.get(task, 0.0) + 1.0
        self._lookups += 1
        if self._lookups % AGE_EVERY == 0:
            self.freq = {t: f / 2 for t, f in self.freq.items() if f >= 0.5 or t in self.entries}

    def _evict(self, keep: str | None = None) -> None:
        """By the policy (LRU or LFU order): off the device (to the host when it has room), then out."""
        used = sum(e.nbytes for e in self.entries.values())
        order = list(self.entries)  # least recently used first
        if self.policy == "lfu":
            rank = {t: i for i, t in enumerate(order)}
            order.sort(key=lambda t: (self.freq.get(t, 0.0), rank[t]))
        for task in order:
            if used <= self.budget and (self.capacity is None or len(self.entries) <= self.capacity):
                break
            e = self.entries[task]
            if task == keep or e.pins:
                continue
            del self.entries[task]
            used -= e.nbytes
            self.stats["evictions"] += 1
            # a banked task's slot is freed when the last batch holding it lets go (``BankedTask``);
            # it never waits in host memory: a reload copies it again from the node's object store
            if self.host_budget >= e.nbytes and not hasattr(e.model, "slot"):
                move_own(e.model, self.backbone, "cpu")
                self.host[task] = e
        held = sum(e.nbytes for e in self.host.values())
        while self.host and held > self.host_budget:
            held -= self.host.popitem(last=False)[1].nbytes

    # ------------------------------------------------------------------ alias refresh
    def refresh_once(self) -> None:
        """Prefetch the new version of every resident task whose alias moved; forget a refusal
        once its alias points elsewhere. Runs in the background thread, never in a request."""
        with self._lock:
            resident = {t: e.version for t, e in (*self.host.items(), *self.entries.items())}
            refused = {t: v for t, (_, _, v) in self.unavailable.items()}
        for task, have in {**refused, **resident}.items():
            if self._stop.is_set():
                return
            try:
                version = show_model(self.settings, f"{task}@{self.alias}")["version"]
            except PetlError as e:  # registry unreachable or alias removed: keep serving what we have
                log.warning("alias check for %s failed (serving v%s): %s", task, have, e)
                continue
            if task in refused and version != refused[task]:
                with self._lock:
                    self.unavailable.pop(task, None)
            if task in resident and version != have:
                try:
                    self._pool.submit(self._load_job, task, f"{task}/{version}", False).result()
                except ServeError as e:  # the new version is refused: the old one keeps serving
                    log.error("task %s: version %s refused, still serving v%s: %s", task, version, have, e)

    def start(self) -> None:
        if self._refresher is None:
            def loop():
                while not self._stop.wait(self.refresh_s):
                    try:
                        self.refresh_once()
                    except Exception:  # noqa: BLE001 - the loop must outlive any one fault
                        log.exception("alias refresh failed")

            self._refresher = threading.Thread(target=loop, name="petl-alias-refresh", daemon=True)
            self._refresher.start()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict:
        """Figures for metrics and the bench: resident tasks and bytes, loads, evictions, latency."""
        with self._lock:
            lat = sorted(self.load_ms)
            return {**self.stats, "resident": len(self.entries), "resident_bytes": sum(e.nbytes for e in self.entries.values()),
                    "host_resident": len(self.host), "host_bytes": sum(e.nbytes for e in self.host.values()),
                    "loading": len(self.loading),
                    "load_ms_p50": round(lat[len(lat) // 2], 2) if lat else None,
                    "load_ms_max": round(lat[-1], 2) if lat else None}

    def _client_safe(self, message: str, path, ref: str) -> str:
        """``message`` without this server's file paths: the adapter copy and the backbone file."""
        name = str(getattr(self.backbone, "petl_name", ""))
        if path:
            message = message.replace(str(path), ref)
        return message.replace(name, Path(name).name) if os.sep in name else message


@contextmanager
def fetched(settings: TrackingSettings, ref: str):
    """``(path, version_info)`` of ``ref``'s adapter in a temporary directory that is deleted on exit
    (a loaded model holds its tensors in memory, so no copy outlives the load). 404 when the
    registry has no such model or alias, 503 when the registry or the artifact store fails: the
    store's own message (bucket, URL) goes to the log, not to the client."""
    tmp = tempfile.mkdtemp(prefix="petl-serve-")
    try:
        try:
            path, info = fetch_adapter(settings, ref, dst=tmp)
        except NotFoundError:
            task, at, alias = ref.partition("@") if "@" in ref else ref.partition("/")
            what = f"under alias {alias!r}" if at == "@" else f"{alias}"
            raise ServeError(404, f"task {task!r} has no registered version {what}") from None
        except PetlError as e:
            log.error("cannot fetch %s: %s", ref, e)
            raise ServeError(503, f"task {ref.replace('/', '@').split('@', 1)[0]!r} is unavailable: the model registry or artifact "
                                  "store did not answer; retry later") from None
        yield path, info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(settings: TrackingSettings, task: str, alias: str = CHAMPION, version: int | None = None) -> dict:
    """The catalog row of ``task``: method and classes of the version ``alias`` points at (or of
    ``version``), read from its ``adapter_config.json``; or ``{"task", "error"}`` with a client-safe
    message."""
    from ..tracking.artifacts import read_adapter_config

    ref = f"{task}/{version}" if version is not None else f"{task}@{alias}"
    try:
        with fetched(settings, ref) as (path, info):
            try:
                cfg = read_adapter_config(path)
            except PetlError as e:
                raise PetlError(str(e).replace(str(path), ref)) from None
    except PetlError as e:
        log.error("task %s is unavailable: %s", task, e)
        return {"task": task, "error": str(e)}
    return {"task": task, "method": cfg["method"], "alias": alias, "version": info["version"],
            "classes": cfg.get("classes")}

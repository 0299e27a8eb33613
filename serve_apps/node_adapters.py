"""Adapter loads off the replica's hot path: one fetcher per node puts each adapter version's flat
arrays into Ray's object store once, and every replica on that node reads them from there, zero-copy.

    replica (TaskModelCache, loader thread)            NodeAdapters actor (one per node and registry)
      fetch = NodeFetch(settings, fingerprint, ...)
      ── ray.get(actor.fetch.remote(ref)) ──────────►  alias -> version (cached for max_age_s)
                                                       cached (task, version)?  "node": its ObjectRef
                                                       else registry look-up + S3 download +
                                                            safetensors read + checks, ray.put once: "s3"
      ◄── {version, config, [state ObjectRef], source}
      ray.get(state ref): numpy views of the object store's memory (no copy)
      torch.from_numpy: read-only CPU tensors; the store's admit step copies them into the replica's
      bank (or module tree), its one copy

- **The actor.** ``NodeAdapters``, named ``petl-adapters-<node id[:12]>-<registry key>`` in namespace
  ``petl`` (``NAMESPACE``): one per node *and* registry (tracking URI + artifact root), so two apps on
  other registries never share a cache. ``lifetime="detached"``, ``num_cpus=0``, pinned to its node
  (``NodeAffinitySchedulingStrategy(node, soft=False)``), created by the first replica that needs it
  (``get_if_exists``): a second replica, or a restarted one, finds it and the adapters in it. It
  lives as long as the Ray cluster; Ray restarts it if it dies (its cache is then empty again).
- **Staleness.** ``task@alias`` is resolved to a version once per ``max_age_s`` (the replica passes its
  store's ``refresh_s``, 10 s by default): within that window a task already on the node costs no
  registry call, and an alias move is seen at most ``max_age_s`` late, the bound the store's own
  alias refresh already has. ``task/version`` refs are never re-resolved (a version does not change).
- **The byte bound.** The node keeps at most ``max_mb`` (default 1024 MB, set by the replica that
  creates the actor) of arrays, least recently used out first; an evicted version is downloaded
  again on its next cold load. A replica that holds a version keeps it in its own store regardless.
- **Errors.** Missing tasks and a registry or store that does not answer are the store's
  ``ServeError`` (404 / 503), a version that cannot be served is ``AdapterRefused``: the replica
  re-raises the same class, status, version and message as the in-process path
  (``fetch_from_registry``). Refusals are remembered per (task, version, backbone fingerprint).
- **Fallback.** Outside Ray (``ray.is_initialized()`` false) ``node_fetch`` is the in-process
  registry fetch; if the actor cannot be reached (died, unschedulable, a bug), the replica logs a
  warning and loads that one adapter itself, as before this module existed.

The core package never imports Ray: this module is the Serve app's (``serve_apps/deployments.py``
passes ``fetch=node_fetch(...)`` to ``Stack.store``)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable

import ray
import numpy as np
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from petl_platform.errors import NotFoundError, PetlError
from petl_platform.serving import ServeError
from petl_platform.serving.models import AdapterRefused, Fetched, fetch_from_registry
from petl_platform.tracking.runs import show_model
from petl_platform.tracking.settings import TrackingSettings

log = logging.getLogger("petl.serve")
NAMESPACE = "petl"
MB = 2**20
_REF = "\x00ref\x00"  # stands for the caller's ref in a remembered refusal message

# The object store's arrays are read-only and shared by every replica on the node: the tensors made
# of them here are too (torch warns once that it cannot mark them so). The store's admit step copies
# them into the replica's bank or module tree and never writes them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)


def registry_key(settings: TrackingSettings) -> str:
    """A short digest of the registry a node cache serves (tracking URI and artifact root)."""
    return hashlib.sha1(f"{settings.tracking_uri}|{settings.artifact_root}".encode()).hexdigest()[:8]


def actor_name(settings: TrackingSettings, node_id: str) -> str:
    return f"petl-adapters-{node_id[:12]}-{registry_key(settings)}"


def split_ref(ref: str) -> tuple[str, str, str]:
    """``("task", "@", "alias")`` or ``("task", "/", "version")``, as the store's ``fetched`` reads a ref."""
    return ref.partition("@") if "@" in ref else ref.partition("/")


ALIGN = 64  # every tensor starts on a 64-byte boundary of the buffer (any dtype's view is aligned)


def pack(state: dict[str, torch.Tensor]) -> dict:
    """Flat CPU tensors as ONE ``uint8`` numpy buffer for the object store, with an index of
    ``(key, dtype, shape, offset, nbytes)``: any dtype travels (bf16 too), and a replica reads it
    with one buffer to map and no per-tensor deserialization."""
    index, parts, off = [], [], 0
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8)
        pad = -off % ALIGN
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
            off += pad
        index.append((k, str(t.dtype).removeprefix("torch."), tuple(t.shape), off, raw.numel()))
        parts.append(raw)
        off += raw.numel()
    buffer = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.uint8)
    return {"buffer": buffer, "index": index}


def unpack(blob: dict) -> dict[str, torch.Tensor]:
    """``pack``'s tensors as views of its buffer (read-only: the object store's, on a replica)."""
    buf = torch.from_numpy(blob["buffer"])
    out = {}
    for k, dtype, shape, off, n in blob["index"]:
        dtype = getattr(torch, dtype)
        out[k] = buf[off:off + n].view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    return out


class NodeAdapters:
    """The per-node fetcher (a detached Ray actor: ``node_actor``). ``fetch(ref, ...)`` returns
    ``{"version", "config", "state_ref": [ObjectRef of pack()'s dict], "source": "s3" | "node"}`` or
    ``{"error": "serve", "status", "message"}`` / ``{"error": "refused", "version", "message"}``.
    Threaded (``max_concurrency``): a slow download holds up only fetches of the same task."""

    def __init__(self, settings: TrackingSettings, max_mb: float = 1024.0):
        self.settings = settings
        self.max_bytes = int(max_mb * MB)
        self._lock = threading.Lock()  # bookkeeping only, never across a registry call or a download
        self._task_locks: dict[str, threading.Lock] = {}  # one load of a task at a time on this node
        self._cache: OrderedDict[tuple[str, int], tuple[dict, list, int]] = OrderedDict()  # config, [ref], bytes
        self._aliases: dict[tuple[str, str], tuple[int, float]] = {}  # (task, alias) -> version, when read
        self._refused: OrderedDict[tuple[str, int, str | None], str] = OrderedDict()  # -> message with _REF
        self._stats = {"downloads": 0, "hits": 0, "refused": 0, "errors": 0, "evictions": 0, "registry_calls": 0}

    # ------------------------------------------------------------------ the actor's API
    def fetch(self, ref: str, fingerprint: str | None = None, backbone_name: str = "?",
              max_age_s: float = 10.0) -> dict:
        try:
            return self._fetch(ref, fingerprint, backbone_name, max_age_s)
        except ServeError as e:
            with self._lock:
                self._stats["errors"] += 1
            return {"error": "serve", "status": e.status, "message": str(e)}
        except AdapterRefused as e:
            with self._lock:
                self._stats["refused"] += 1
            return {"error": "refused", "version": e.version, "message": str(e)}

    def stats(self) -> dict:
        with self._lock:
            return {**self._stats, "entries": len(self._cache), "bytes": sum(b for _, _, b in self._cache.values()),
                    "max_bytes": self.max_bytes, "versions": sorted(f"{t}/{v}" for t, v in self._cache)}

    def forget(self) -> None:
        """Drop every cached version and alias (tests; an operator's reset)."""
        with self._lock:
            self._cache.clear()
            self._aliases.clear()
            self._refused.clear()

    # ------------------------------------------------------------------ inside
    def _task_lock(self, task: str) -> threading.Lock:
        with self._lock:
            return self._task_locks.setdefault(task, threading.Lock())

    def _fetch(self, ref: str, fingerprint: str | None, backbone_name: str, max_age_s: float) -> dict:
        task, at, what = split_ref(ref)
        with self._task_lock(task):
            version = self._version(task, at, what, max_age_s)
            with self._lock:
                hit = self._cache.get((task, version)) if version is not None else None
                if hit is not None:
                    self._cache.move_to_end((task, version))
                refused = self._refused.get((task, version, fingerprint))
            if refused is not None:
                raise AdapterRefused(version, refused.replace(_REF, ref))
            if hit is not None:
                cfg, state_ref, _ = hit
                have = cfg.get("backbone_fingerprint")
                if fingerprint is not None and have != fingerprint:  # read_adapter's check and words
                    raise AdapterRefused(version, f"adapter {ref} was trained on backbone {cfg.get('backbone')!r} with "
                                                  f"fingerprint {have}, but the given backbone {backbone_name!r} "
                                                  f"has fingerprint {fingerprint}")
                with self._lock:
                    self._stats["hits"] += 1
                return {"version": version, "config": cfg, "state_ref": state_ref, "source": "node"}
            try:
                got = fetch_from_registry(self.settings, ref, fingerprint, backbone_name)
            except AdapterRefused as e:
                with self._lock:
                    self._refused[(task, e.version, fingerprint)] = str(e).replace(ref, _REF)
                    while len(self._refused) > 1024:
                        self._refused.popitem(last=False)
                raise
            blob = pack(got.state)
            nbytes = blob["buffer"].nbytes
            state_ref = [ray.put(blob)]  # the one copy into this node's object store
            with self._lock:
                self._stats["downloads"] += 1
                if at == "@":
                    self._aliases[(task, what)] = (got.version, time.monotonic())
                self._cache[(task, got.version)] = (got.config, state_ref, nbytes)
                self._evict()
            return {"version": got.version, "config": got.config, "state_ref": state_ref, "source": "s3"}

    def _version(self, task: str, at: str, what: str, max_age_s: float) -> int | None:
        """The version ``ref`` names now, when this node may hold it; None when it cannot (a cold
        task: the download resolves the alias itself, one registry call instead of two)."""
        if at != "@":
            return int(what) if what.isdigit() else None
        now = time.monotonic()
        with self._lock:
            seen = self._aliases.get((task, what))
            if seen is not None and now - seen[1] < max_age_s:
                return seen[0]
            known = any(k[0] == task for k in self._cache) or any(k[0] == task for k in self._refused)
        if not known:
            return None
        with self._lock:
            self._stats["registry_calls"] += 1
        try:
            version = show_model(self.settings, f"{task}@{what}")["version"]
        except NotFoundError:  # the words of serving.models.fetched
            raise ServeError(404, f"task {task!r} has no registered version under alias {what!r}") from None
        except PetlError as e:
            log.error("cannot resolve %s@%s: %s", task, what, e)
            raise ServeError(503, f"task {task!r} is unavailable: the model registry or artifact store did not "
                                  "answer; retry later") from None
        with self._lock:
            self._aliases[(task, what)] = (version, now)
        return version

    def _evict(self) -> None:
        """Least recently used first, down to ``max_bytes``; the newest entry stays even when it alone
        is over (its ref is on its way to the caller, who borrows it)."""
        used = sum(b for _, _, b in self._cache.values())
        while len(self._cache) > 1 and used > self.max_bytes:
            _, (_, _, nbytes) = self._cache.popitem(last=False)
            used -= nbytes
            self._stats["evictions"] += 1


_Actor = ray.remote(NodeAdapters)


def node_actor(settings: TrackingSettings, max_mb: float = 1024.0, node_id: str | None = None,
               name: str | None = None):
    """The handle of this node's ``NodeAdapters`` for ``settings``' registry, created if needed."""
    node = node_id or ray.get_runtime_context().get_node_id()
    return _Actor.options(name=name or actor_name(settings, node), namespace=NAMESPACE, get_if_exists=True,
                          lifetime="detached", num_cpus=0, max_concurrency=16, max_restarts=-1, max_task_retries=1,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(settings, max_mb)


class NodeFetch:
    """The adapter store's ``fetch`` hook in a replica (``TaskModelCache(fetch=NodeFetch(...))``):
    ``ref`` through this node's ``NodeAdapters``, tensors read zero-copy from the object store."""

    def __init__(self, settings: TrackingSettings, fingerprint: str | None = None, backbone_name: str = "?",
                 max_age_s: float = 10.0, max_mb: float = 1024.0, timeout_s: float = 300.0,
                 actor_name: str | None = None):
        self.settings, self.fingerprint, self.backbone_name = settings, fingerprint, backbone_name
        self.max_age_s, self.max_mb, self.timeout_s, self.name = max_age_s, max_mb, timeout_s, actor_name
        self.fallbacks = 0  # loads this replica made itself because the node's actor failed
        self._actor = None
        self._lock = threading.Lock()

    def actor(self):
        with self._lock:
            if self._actor is None:
                self._actor = node_actor(self.settings, self.max_mb, name=self.name)
            return self._actor

    def warm(self, timeout_s: float = 120.0) -> bool:
        """Find or start the node's actor and wait until it answers (a replica's start-up: the
        actor's own start, seconds of imports, is then not part of the first cold load). False, with
        a warning, when it does not answer: loads then fall back as in ``__call__``."""
        try:
            ray.get(self.actor().stats.remote(), timeout=timeout_s)
            return True
        except ray.exceptions.RayError as e:
            log.warning("the node's adapter cache did not start (%s); loads will retry it",
                        str(e).splitlines()[0][:300])
            with self._lock:
                self._actor = None
            return False

    def __call__(self, ref: str) -> Fetched:
        t0 = time.perf_counter()
        try:
            got = ray.get(self.actor().fetch.remote(ref, self.fingerprint, self.backbone_name, self.max_age_s),
                          timeout=self.timeout_s)
            blob = ray.get(got["state_ref"][0], timeout=self.timeout_s) if "error" not in got else None
        except ray.exceptions.RayError as e:
            log.warning("the node's adapter cache failed (%s); loading %s in this replica",
                        str(e).splitlines()[0][:300], ref)
            with self._lock:
                self._actor, self.fallbacks = None, self.fallbacks + 1
            return fetch_from_registry(self.settings, ref, self.fingerprint, self.backbone_name)
        if got.get("error") == "serve":
            raise ServeError(got["status"], got["message"])
        if got.get("error") == "refused":
            raise AdapterRefused(got["version"], got["message"])
        return Fetched(got["version"], got["config"], unpack(blob), got["source"], 1000 * (time.perf_counter() - t0))

    def stats(self) -> dict:
        """The node actor's figures (downloads, hits, bytes, ...)."""
        return ray.get(self.actor().stats.remote(), timeout=self.timeout_s)


def node_fetch(settings: TrackingSettings, fingerprint: str | None = None, backbone_name: str = "?",
               max_age_s: float = 10.0, max_mb: float = 1024.0, **options) -> Callable[[str], Fetched]:
    """The ``fetch`` hook for a replica's adapter store: through this node's object store in a Ray
    worker (``NodeFetch``), else the in-process registry fetch (``fetch_from_registry``)."""
    if not ray.is_initialized():
        return lambda ref: fetch_from_registry(settings, ref, fingerprint, backbone_name)
    return NodeFetch(settings, fingerprint, backbone_name, max_age_s, max_mb, **options)

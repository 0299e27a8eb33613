"""The deployments behind the Ingress (``serve_apps/ingress.py``), one per runtime a method declares
(``MethodSpec.runtime``), all the same replica (``_Replica``) with its own role:

    TrunkBackbone       linear / DTL tasks: the frozen trunk once per batch for every task that
                        shares it; their heads / side-network tails live here too
    EarlyExitRouter     Dyn-* tasks: stage by stage, exited samples leave the batch
    TokenDispatchRouter DyT tasks: the active tokens of every task in the batch, one MLP call per layer
    TaskAdapters        LoRA / Adapter / RepAdapter / ARC: frozen ops once, each row's own deltas

A replica holds the frozen backbone, the mixed-task engine and the adapter store
(``petl_platform.serving.Stack``), batches across requests and tasks (``serving.Batcher``), and
reports its store, bank, load, latency, batch, exit-stage and token-activation metrics. Its store
fetches adapters through the node's fetcher and object store (``node_adapters.py``, ``node_cache``):
registry look-ups, downloads and reads run there, once per node, not in the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch
from ray import serve
from ray.serve.metrics import Gauge, Histogram

from petl_platform.backbones import SHIPPED
from petl_platform.errors import PetlError
from petl_platform.inference import Row
from petl_platform.methods.registry import spec_of
from petl_platform.serving import Batcher, ServeError, Stack, answer
from petl_platform.tracking.settings import CHAMPION, TrackingSettings
from serve_apps.node_adapters import node_fetch

log = logging.getLogger("petl.serve")
ROLES = ("trunk", "early_exit", "token_dispatch", "adapter")


# the deployment that serves each runtime a method declares in its MethodSpec
ROLE_OF_RUNTIME = {"shared_trunk": "trunk", "per_row_adapter": "adapter", "early_exit": "early_exit",
                   "token_dispatch": "token_dispatch"}


def error_body(e: ServeError) -> dict:
    """The JSON body of an error: status and a one-line message, never an object address."""
    from petl_platform.serving.request import safe_text

    return {"error": e.status, "detail": safe_text(str(e), 2000)}


class _Replica:
    """The frozen backbone once per replica (on the GPU when the replica has one), the adapter store
    on top of it, and the mixed-task engine that answers a whole batch in one pass. Every
    deployment batches across requests AND tasks (``serving.Batcher``, continuous batching in rows;
    why not ``@serve.batch``: see its module): each request carries its task ids as data
    (``@serve.multiplexed`` would split batches per task). A request whose task is cold waits for
    that load before it joins a batch (its load starts when it arrives, however long the queue ahead
    of it: a prefetch), so a batch never waits on a load; it runs with the rows that are ready."""

    role = ""

    def __init__(self, backbone: str = SHIPPED, alias: str = CHAMPION, capacity: int | None = None,
                 refresh_s: float = 10.0, dtype: str | None = None, capacity_mb: float = 256.0,
                 host_mb: float | None = None, load_timeout_s: float = 30.0, warm: list[str] | None = None,
                 threads: int | None = None, node_cache: bool = True, node_cache_mb: float = 1024.0,
                 eviction: str = "lru"):
        if threads:  # Ray sets OMP_NUM_THREADS=1 in an actor with num_cpus < 2: the engine then uses one core
            torch.set_num_threads(int(threads))
        stack = Stack.build(backbone, dtype=dtype)  # a replica with num_gpus sees its GPU: the engine runs there
        self.backbone, self.engine = stack.backbone, stack.engine
        settings = TrackingSettings.from_env()
        fetch = None  # the store's own: registry + S3 in this process
        if node_cache:  # registry look-ups, downloads and reads in the node's fetcher; arrays via its object store
            fetch = node_fetch(settings, getattr(self.backbone, "fingerprint", None),
                               str(getattr(self.backbone, "petl_name", "?")), max_age_s=refresh_s, max_mb=node_cache_mb)
            if hasattr(fetch, "warm"):  # the node's actor started now, not in the first cold load
                fetch.warm()
        self.cache = stack.store(settings, alias, capacity=capacity, refresh_s=refresh_s, capacity_mb=capacity_mb,
                                 host_mb=host_mb, load_timeout_s=load_timeout_s, fetch=fetch, policy=eviction)
        self.m_cache = Gauge("petl_adapter_store", description="adapter store per replica: resident tasks and bytes, "
                             "loads, evictions, hits, misses, refused", tag_keys=("kind",))
        self.m_load = Histogram("petl_adapter_load_ms", description="cold load time of a task adapter, by where "
                                "its tensors came from: s3 (the registry's store) or node (the node's object store)",
                                boundaries=[10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 30000], tag_keys=("source",))
        self.m_bank = Gauge("petl_adapter_bank_slots", description="the engine's adapter banks: slots used and free",
                            tag_keys=("bank", "state"))
        self.m_latency = Histogram("petl_task_latency_ms", description="per-task compute latency in the replica",
                                   boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000], tag_keys=("task",))
        self.m_batch = Histogram("petl_batch_size", description="batch sizes formed by the batcher "
                                 "(Serve adds the deployment tag)", boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.m_exit = Histogram("petl_exit_stage", description="exit stage of each Dyn-* sample",
                                boundaries=[1.5, 2.5, 3.5, 4.5, 5.5, 6.5], tag_keys=("task",))
        self.m_rate = Histogram("petl_token_activation_rate", description="DyT measured token activation per batch",
                                boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], tag_keys=("task",))
        self._loads_seen, self._metrics_at = 0, 0.0
        self.batcher = Batcher(self._run_batch, max_rows=32, wait_s=0.002)  # reconfigure() sets both
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
            x = torch.zeros(1, 3, *self.engine.image_size, dtype=torch.uint8)
            self.engine.run(x, [Row(0, t) for t in mine], {t: e.model for t, e in mine.items()})
        log.info("%s warm: %d of %d named tasks", type(self).__name__, len(mine), len(tasks))

    def reconfigure(self, config: dict) -> None:
        """Serve YAML ``user_config``: the batch size (in rows: images x tasks) and the longest wait for
        company of this deployment's batcher (``serving.Batcher``)."""
        self.batcher.max_rows = int(config.get("max_batch_size", 32))
        self.batcher.wait_s = float(config.get("batch_wait_timeout_s", 0.002))

    def _metrics(self) -> None:
        """The store's and the banks' gauges, at most once a second (11 gauge sets a request cost
        ~1 ms of a replica's CPU per request in the profile), and every load since, by source."""
        now = time.monotonic()
        if now - self._metrics_at < 1.0 and self.cache.stats["loads"] == self._loads_seen:
            return
        self._metrics_at = now
        snap = self.cache.snapshot()
        for kind in ("resident", "resident_bytes", "host_resident", "host_bytes", "loads", "loads_s3", "loads_node",
                     "evictions", "hits", "misses", "refused", "refreshes", "load_timeouts"):
            self.m_cache.set(snap[kind], tags={"kind": kind})
        new = min(max(0, snap["loads"] - self._loads_seen), len(self.cache.load_ms))
        ms_list, sources = self.cache.load_ms, self.cache.load_sources  # in step (a load between the reads: off by one)
        for ms, source in zip(ms_list[len(ms_list) - new:], sources[len(sources) - new:]):
            self.m_load.observe(ms, tags={"source": source})
        self._loads_seen = snap["loads"]
        if hasattr(self.engine, "bank_stats"):
            banks: dict[str, list[int]] = {}  # per method: banks of other shapes add up
            for b in self.engine.bank_stats():
                slots_used = banks.setdefault(str(b["bank"]), [0, 0])
                slots_used[0] += int(b["slots"])
                slots_used[1] += int(b["used"])
            for bank, (slots, used) in banks.items():
                self.m_bank.set(used, tags={"bank": bank, "state": "used"})
                self.m_bank.set(slots - used, tags={"bank": bank, "state": "free"})

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

    async def run(self, x: torch.Tensor, tasks: list[str], knobs: dict, versions: dict | None = None) -> list[dict]:
        """Per image of ``x`` (``uint8 [N, 3, H, W]`` pixels at the model's size, normalized here),
        ``{task: answer or error}``: the request's cold tasks load first (off the event loop, never
        holding up other requests), then its rows (images x tasks) join the mixed-task batch. A
        request larger than a batch is cut into batch-sized pieces of whole images. ``versions``:
        the version each task was routed by (the ingress's catalog); a resident task at another
        version is checked against the registry before it answers (``TaskModelCache.current``)."""
        versions = versions or {}
        entries = {t: self.cache.current(t, versions.get(t)) for t in dict.fromkeys(tasks)}
        cold = [t for t, e in entries.items() if e is None]
        bad = {}
        if cold:
            got = await asyncio.gather(*(self.cache.aget(t, version=versions.get(t)) for t in cold),
                                       return_exceptions=True)
            for t, g in zip(cold, got):
                if isinstance(g, ServeError):
                    bad[t] = error_body(g)
                elif isinstance(g, BaseException):
                    raise g
                else:
                    entries[t] = g
        ready = [t for t in dict.fromkeys(tasks) if t not in bad]
        out = [{} for _ in range(len(x))]
        if ready:
            step = max(1, self.batcher.max_rows // len(ready))  # whole images per piece
            mine = {t: entries[t] for t in ready}
            pieces = await asyncio.gather(*(self.batcher.submit(_Job(x[i:i + step], ready, knobs, mine),
                                                                len(x[i:i + step]) * len(ready))
                                            for i in range(0, len(x), step)))
            out = [a for piece in pieces for a in piece]
        self._metrics()
        return [{**o, **bad} for o in out]

    async def _run_batch(self, jobs: list[_Job]) -> list[list[dict]]:
        """Per request piece, per image: ``{task: answer or error}``. The batch (counted in rows:
        images x tasks, see ``serving.Batcher``), every task and method in it, is one engine call."""
        self.m_batch.observe(sum(len(j.x) * len(j.tasks) for j in jobs))
        out = [[{} for _ in range(len(j.x))] for j in jobs]
        # the store's entry when the task is still resident; else the one its requests held from when
        # they joined the queue: an evicted task stays usable for them (a banked slot is freed only
        # when its last holder lets go), so a batch never waits on a load
        entries = {}
        for j in jobs:
            for t, e in j.entries.items():
                if t not in entries:
                    entries[t] = self.cache.resident(t) or e
        rows, where, base = [], [], 0
        for i, j in enumerate(jobs):
            for t in j.tasks:
                if t not in entries:
                    continue
                try:
                    k = self.row_knobs(entries[t], j.knobs)
                except ServeError as err:
                    for o in out[i]:
                        o[t] = error_body(err)
                    continue
                for n in range(len(j.x)):
                    rows.append(Row(base + n, t, k))
                    where.append((i, n))
            base += len(j.x)
        if not rows:
            return out
        t0 = time.perf_counter()
        x = torch.cat([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
        try:
            with self.cache.pinned(entries.values()):
                results = await asyncio.to_thread(self.engine.run, x, rows, {t: e.model for t, e in entries.items()})
        except PetlError as err:  # a request the engine refuses (e.g. a knob that does not fit)
            for r, (i, n) in zip(rows, where):
                out[i][n][r.task] = error_body(ServeError(400, f"task {r.task!r}: {err}"))
            return out
        ms = 1000 * (time.perf_counter() - t0)
        for t in dict.fromkeys(r.task for r in rows):
            self.m_latency.observe(ms, tags={"task": t})
        for r, res, (i, n) in zip(rows, results, where):
            e, knobs = entries[r.task], jobs[i].knobs
            if res.exit_stage is not None:
                self.m_exit.observe(res.exit_stage, tags={"task": r.task})
            if "activation_rate" in res.compute:
                self.m_rate.observe(res.compute["activation_rate"], tags={"task": r.task})
            out[i][n][r.task] = answer(res.logits, e.classes, knobs["top_k"], probabilities=knobs.get("probabilities",
                                       False), method=e.method, version=e.version, exit_stage=res.exit_stage,
                                       compute=res.compute)
        return out


@dataclass
class _Job:
    """A request (or a batch-sized piece of one) in a replica's batch: its ``uint8`` images, its
    tasks and knobs."""

    x: torch.Tensor
    tasks: list[str]
    knobs: dict
    entries: dict  # task -> the store's entry, held from when the request joined the queue


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


# Deployments wrap module-level classes, so Ray pickles the classes by reference (importable on
# every worker: serve_apps is installed with the project) rather than by value.
TrunkBackbone = serve.deployment(name="TrunkBackbone")(_TrunkBackbone)
TaskAdapters = serve.deployment(name="TaskAdapters")(_TaskAdapters)
EarlyExitRouter = serve.deployment(name="EarlyExitRouter")(_EarlyExitRouter)
TokenDispatchRouter = serve.deployment(name="TokenDispatchRouter")(_TokenDispatchRouter)

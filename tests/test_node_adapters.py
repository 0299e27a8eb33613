"""Adapter loads through the node's fetcher and object store (``serve_apps/node_adapters.py``): the
tensors equal the registry path's, a second or restarted replica on the node reads them from the
object store with S3 hung, errors keep their status and words, the node's cache keeps its byte
bound and sees an alias move within its max age. One local Ray cluster and one platform stack (moto
S3 behind a proxy that can hang, MLflow on SQLite) for the module; the unit tests need neither."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from petl_platform.serving import ServeError

CLASSES = ["a", "b", "c"]


# ------------------------------------------------------------------------------- no Ray needed
def test_pack_and_unpack_keep_every_dtype_and_shape():
    from serve_apps.node_adapters import pack, unpack

    state = {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "b": torch.tensor([True, False]),
             "s": torch.tensor(2.5, dtype=torch.float16), "e": torch.zeros(0, 7), "i": torch.arange(6).reshape(2, 3),
             "t": torch.randn(4, 6).t()}  # not contiguous
    blob = pack(state)
    assert blob["buffer"].dtype.name == "uint8" and blob["buffer"].ndim == 1  # one buffer for the object store
    assert all(off % 64 == 0 for _, _, _, off, _ in blob["index"])
    back = unpack(blob)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_outside_ray_the_hook_is_the_registry_fetch(monkeypatch):
    import ray

    import serve_apps.node_adapters as na

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(na, "fetch_from_registry", lambda *a: calls.append(a) or "fetched")
    hook = na.node_fetch("settings", "fp", "bb")
    assert not isinstance(hook, na.NodeFetch) and hook("t@champion") == "fetched"
    assert calls == [("settings", "t@champion", "fp", "bb")]


def test_replica_metrics_by_source_and_bank_slots():
    """``_Replica._metrics``: loads from S3 and from the node as store kinds, the load histogram
    tagged by source, the engine's banks as used / free slots (banks of one method add up)."""
    from serve_apps.deployments import _Replica

    class Rec:
        def __init__(self):
            self.calls = []

        def set(self, v, tags=None):
            self.calls.append((v, tags))

        observe = set

    snap = {k: 0 for k in ("resident", "resident_bytes", "host_resident", "host_bytes", "evictions", "hits", "misses",
                           "refused", "refreshes", "load_timeouts")}
    snap.update(loads=3, loads_s3=2, loads_node=1)
    cache = SimpleNamespace(stats={"loads": 3}, snapshot=lambda: snap, load_ms=[5.0, 7.0, 9.0, 1.0],
                            load_sources=["s3", "s3", "s3", "node"])
    engine = SimpleNamespace(bank_stats=lambda: [{"bank": "lora", "slots": 8, "used": 3},
                                                 {"bank": "lora", "slots": 4, "used": 4},
                                                 {"bank": "adapter", "slots": 2, "used": 0}])
    rep = SimpleNamespace(cache=cache, engine=engine, m_cache=Rec(), m_load=Rec(), m_bank=Rec(), _loads_seen=1,
                          _metrics_at=0.0)
    _Replica._metrics(rep)
    kinds = {t["kind"]: v for v, t in rep.m_cache.calls}
    assert kinds["loads_s3"] == 2 and kinds["loads_node"] == 1 and kinds["loads"] == 3
    assert rep.m_load.calls == [(9.0, {"source": "s3"}), (1.0, {"source": "node"})]  # the 2 loads since
    banks = {(t["bank"], t["state"]): v for v, t in rep.m_bank.calls}
    assert banks == {("lora", "used"): 7, ("lora", "free"): 5, ("adapter", "used"): 0, ("adapter", "free"): 2}
    assert rep._loads_seen == 3


# ------------------------------------------------------------------------------- on Ray
def _randomized(model):
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    import ray

    from petl_platform import create_backbone
    from petl_platform.cluster.connect import ensure_ray
    from petl_platform.methods import build_model
    from petl_platform.tracking.runs import log_and_register
    from platform_stack import TINY, StallProxy, platform_stack

    with platform_stack(tmp_path_factory.mktemp("node")) as st:
        settings, bb = st["settings"], create_backbone(st["backbone"])
        torch.manual_seed(0)
        log_and_register(settings, _randomized(build_model("lora", bb, 3, rank=2)), "t-lora", CLASSES)
        log_and_register(settings, _randomized(build_model("linear", bb, 3)), "t-linear", CLASSES)
        poisoned = build_model("lora", bb, 3, rank=2)
        for p in poisoned.parameters():
            if p.requires_grad:
                p.data.fill_(float("nan"))
        log_and_register(settings, poisoned, "t-nan", CLASSES)
        torch.manual_seed(123)
        log_and_register(settings, build_model("linear", create_backbone("vit_tiny_patch16_224", **TINY), 3),
                         "t-other", CLASSES)  # another fingerprint
        # the node's actor reaches S3 through a proxy a test can make hang
        proxy = StallProxy(int(st["endpoint"].rsplit(":", 1)[1]))
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = proxy.url
        started = ensure_ray(num_cpus=2)
        try:
            yield {**st, "bb": bb, "proxy": proxy}
        finally:
            proxy.stalled.clear()
            proxy.close()
            if started is not None:
                ray.shutdown()


def _hook(node, **kw):
    from serve_apps.node_adapters import NodeFetch, node_fetch

    bb = node["bb"]
    fetch = node_fetch(node["settings"], bb.fingerprint, str(bb.petl_name), **{"max_age_s": 60.0, **kw})
    assert isinstance(fetch, NodeFetch)
    return fetch


def _store(node, fetch=None):
    from petl_platform.serving.models import TaskModelCache

    return TaskModelCache(node["bb"], node["settings"], fetch=fetch)


def _same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


@pytest.mark.slow
def test_the_node_serves_the_registry_tensors_and_a_second_replica_pays_no_download(node):
    from petl_platform.serving.models import fetch_from_registry

    bb, settings = node["bb"], node["settings"]
    first = _hook(node)
    entry = _store(node, first).get("t-lora", timeout=60)  # replica 1: cold on the node, from S3
    assert entry.source == "s3" and entry.version == 1
    before = first.stats()
    assert before["downloads"] == 1 and before["entries"] == 1 and before["bytes"] > 0

    want = fetch_from_registry(settings, "t-lora@champion", bb.fingerprint, str(bb.petl_name))
    got = first("t-lora@champion")
    assert got.source == "node" and got.version == want.version and got.config == want.config
    _same_state(got.state, want.state)

    node["proxy"].stalled.set()  # S3 hangs: replica 2 must not need it
    try:
        second = _hook(node)
        cache = _store(node, second)
        again = cache.get("t-lora", timeout=20)
        assert again.source == "node" and cache.stats["loads_node"] == 1 and cache.stats["loads_s3"] == 0
        after = second.stats()
        assert after["downloads"] == before["downloads"] and after["registry_calls"] == before["registry_calls"]
        assert after["hits"] == before["hits"] + 2
    finally:
        node["proxy"].stalled.clear()
    x = torch.randn(2, 3, 32, 32)
    baseline = _store(node).get("t-lora", timeout=60)  # the in-process registry path
    assert baseline.source == "s3"
    with torch.no_grad():
        assert torch.equal(entry.model(x), baseline.model(x)) and torch.equal(again.model(x), baseline.model(x))


@pytest.mark.slow
def test_a_restarted_replica_in_another_process_finds_the_adapter_on_the_node(node):
    import ray

    bb = node["bb"]
    _hook(node)("t-linear@champion")  # on the node now

    @ray.remote(num_cpus=0)
    def replica(settings, fingerprint, name):
        from serve_apps.node_adapters import NodeFetch

        got = NodeFetch(settings, fingerprint, name, max_age_s=60.0)("t-linear@champion")
        return got.source, got.version, {k: v.clone() for k, v in got.state.items()}

    node["proxy"].stalled.set()
    try:
        source, version, state = ray.get(replica.remote(node["settings"], bb.fingerprint, str(bb.petl_name)),
                                         timeout=120)
    finally:
        node["proxy"].stalled.clear()
    from petl_platform.serving.models import fetch_from_registry

    want = fetch_from_registry(node["settings"], "t-linear/1", bb.fingerprint, str(bb.petl_name))
    assert source == "node" and version == want.version == 1
    _same_state(state, want.state)


@pytest.mark.slow
def test_missing_and_refused_tasks_answer_as_the_registry_path_does(node):
    from petl_platform.serving.models import AdapterRefused

    fetch = _hook(node)
    direct, through = _store(node), _store(node, fetch)
    for task, status in (("t-missing", 404), ("t-nan", 503), ("t-other", 503)):
        errors = []
        for cache in (direct, through, _store(node, _hook(node))):  # the last: a refusal the node remembers
            with pytest.raises(ServeError) as e:
                cache.get(task, timeout=60)
            errors.append((e.value.status, str(e.value)))
        assert errors[0][0] == status and errors[0] == errors[1] == errors[2], task
    with pytest.raises(AdapterRefused) as e:
        fetch("t-nan@champion")
    assert e.value.version == 1 and "NaN or inf" in str(e.value)
    with pytest.raises(AdapterRefused, match="fingerprint"):
        fetch("t-other/1")
    assert fetch.stats()["refused"] >= 6


@pytest.mark.slow
def test_an_alias_move_is_seen_within_max_age_and_versions_stay_cached(node):
    from petl_platform.methods import build_model
    from petl_platform.tracking.runs import log_and_register

    settings, bb = node["settings"], node["bb"]
    log_and_register(settings, _randomized(build_model("linear", bb, 3)), "t-move", CLASSES)
    fetch, fresh = _hook(node), _hook(node, max_age_s=0.0)
    assert [(g.version, g.source) for g in (fetch("t-move@champion"), fetch("t-move@champion"))] == [(1, "s3"),
                                                                                                      (1, "node")]
    log_and_register(settings, _randomized(build_model("linear", bb, 3)), "t-move", CLASSES)  # champion -> v2
    stale = fetch("t-move@champion")
    assert (stale.version, stale.source) == (1, "node")  # within max_age_s: no registry call
    moved = fresh("t-move@champion")
    assert (moved.version, moved.source) == (2, "s3")
    assert (fresh("t-move/1").version, fresh("t-move/1").source) == (1, "node")  # a version is never re-read
    assert fresh("t-move@champion").source == "node"


@pytest.mark.slow
def test_the_node_cache_keeps_its_byte_bound_and_a_dead_actor_falls_back_to_the_registry(node):

    small = _hook(node, max_mb=1e-6, actor_name="petl-adapters-test-small")  # room for one version
    assert small.warm()
    assert small("t-lora@champion").source == "s3" and small("t-linear@champion").source == "s3"
    st = small.stats()
    assert st["entries"] == 1 and st["evictions"] == 1 and st["versions"] == ["t-linear/1"]
    assert small("t-lora@champion").source == "s3"  # evicted: downloaded again

    _kill(small.actor())
    got = small("t-linear@champion")  # the actor is gone: this replica loads the adapter itself
    assert got.source == "s3" and got.version == 1 and small.fallbacks == 1
    assert small("t-linear@champion").source == "s3" and small.fallbacks == 1  # a new actor on the node, empty
    assert small.stats()["downloads"] == 1
    _kill(small.actor())


def _kill(actor) -> None:
    """Kill ``actor`` and wait until calls to it fail (``ray.kill`` returns before it is dead)."""
    import time

    import ray

    ray.kill(actor, no_restart=True)
    for _ in range(200):
        try:
            ray.get(actor.stats.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the actor is still alive")


@pytest.mark.slow
def test_a_replica_loads_through_its_node_unless_node_cache_is_off(node):
    """``_Replica`` (the deployments' class, built here without Serve) wires the node's fetcher into
    its store, warms the actor up, and reports loads by source."""
    from serve_apps.deployments import _TaskAdapters
    from serve_apps.node_adapters import NodeFetch

    before = _hook(node).stats()
    rep = _TaskAdapters(backbone=node["backbone"], refresh_s=60.0, warm=["t-lora"], threads=1)
    try:
        assert isinstance(rep.cache._fetch, NodeFetch) and rep.cache._fetch.fallbacks == 0
        entry = rep.cache.resident("t-lora")
        assert entry is not None and entry.source == "node"  # on the node since the first test, or now
        after = rep.cache._fetch.stats()
        assert after["hits"] > before["hits"] and after["downloads"] == before["downloads"]
        rep._metrics()
        assert rep.cache.snapshot()["loads_node"] == 1 and rep.cache.load_sources == ["node"]
    finally:
        rep.cache.close()
    off = _TaskAdapters(backbone=node["backbone"], refresh_s=60.0, node_cache=False, threads=1)
    try:
        assert not isinstance(off.cache._fetch, NodeFetch) and off.cache.get("t-lora", timeout=60).source == "s3"
    finally:
        off.cache.close()

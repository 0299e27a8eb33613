"""Multi-tenant serving without Ray: the byte-budgeted adapter store (loads off the lock, a hung
store delaying only its own task, alias moves prefetched) and the registry-backed catalog, on the
real MLflow registry (SQLite + a local artifact store) and tiny models."""

from __future__ import annotations

import threading
import time

import pytest

from petl_platform.serving import ServeError


@pytest.fixture
def registry(tmp_path, tiny_backbone):
    from petl_platform.tracking.settings import TrackingSettings

    from platform_stack import sqlite_store  # a migrated template's copy: no 5-15 s of migrations per test

    art = str(tmp_path / "art")
    return TrackingSettings(sqlite_store(tmp_path / "m.db", art), art, str(tmp_path / "ray")).prepare()


def _register(settings, backbone, name, method="lora", classes=("a", "b", "c"), **hparams):
    from petl_platform.methods import build_model
    from petl_platform.tracking.runs import log_and_register

    return log_and_register(settings, build_model(method, backbone, len(classes), **hparams), name, list(classes))


def _lora_bytes(backbone) -> int:
    from petl_platform.methods import build_model
    from petl_platform.serving.models import own_tensors

    m = build_model("lora", backbone, 3)
    return sum(t.numel() * t.element_size() for t in own_tensors(m, backbone))


# ------------------------------------------------------------------------------------ the store
def test_store_keeps_its_byte_budget_in_lru_order(registry, tiny_backbone):
    from petl_platform.serving.models import TaskModelCache

    for i in range(5):
        _register(registry, tiny_backbone, f"t{i}")
    per_task = _lora_bytes(tiny_backbone)
    cache = TaskModelCache(tiny_backbone, registry, capacity_mb=3.5 * per_task / 2**20)
    for t in ("t0", "t1", "t2", "t0", "t3", "t4"):
        entry = cache.get(t)
        assert entry.task == t and entry.nbytes == per_task
    snap = cache.snapshot()
    assert snap["resident"] == 3 and snap["resident_bytes"] == 3 * per_task <= cache.budget
    assert list(cache.entries) == ["t0", "t3", "t4"]  # t0 was used again after t1 and t2: they left first
    assert snap["loads"] == 5 and snap["evictions"] == 2 and snap["hits"] >= 1
    assert snap["load_ms_p50"] > 0
    # the shared backbone is never counted, nor moved: only the task's own tensors
    assert all(p.device == next(tiny_backbone.parameters()).device for p in tiny_backbone.parameters())


def test_banked_store_under_a_working_set_larger_than_the_bank(registry, tiny_backbone):
    """A replica's store (``Stack.store``): loads become bank slots, eviction frees them, a task
    evicted while a request still holds it keeps answering right, and every answer is its own."""
    import gc

    import torch

    from petl_platform.inference import Row
    from petl_platform.inference.banks import BankedTask
    from petl_platform.serving import Stack
    from petl_platform.tracking.runs import fetch_adapter
    from petl_platform.tracking.artifacts import load_adapter

    names = [f"t{i}" for i in range(5)]
    for i, t in enumerate(names):
        torch.manual_seed(i)
        _register(registry, tiny_backbone, t)
    stack = Stack.build(tiny_backbone, device=None)
    per_task = _lora_bytes(tiny_backbone)
    cache = stack.store(registry, capacity_mb=2.5 * per_task / 2**20)
    x = torch.randn(2, 3, 32, 32)
    alone = {t: load_adapter(fetch_adapter(registry, f"{t}@champion")[0], tiny_backbone) for t in names}
    held = cache.get("t0")  # a queued request holding t0
    assert isinstance(held.model, BankedTask) and held.nbytes == per_task
    for t in names[1:] + ["t1", "t2"]:
        e = cache.get(t)
        got = stack.engine.run(x, [Row(0, t), Row(1, t)], {t: e.model})
        torch.testing.assert_close(torch.stack([r.logits for r in got]), alone[t](x).detach(), rtol=0, atol=1e-5)
    snap = cache.snapshot()
    assert snap["resident"] == 2 and snap["evictions"] >= 3 and "t0" not in cache.entries
    got = stack.engine.run(x, [Row(0, "t0"), Row(1, "t0")], {"t0": held.model})  # evicted, still held: still right
    torch.testing.assert_close(torch.stack([r.logits for r in got]), alone["t0"](x).detach(), rtol=0, atol=1e-5)
    del e, got
    gc.collect()
    used = sum(b["used"] for b in stack.engine.bank_stats())
    assert used == 3  # the 2 resident + the held one; every other evicted slot is free again
    del held
    gc.collect()
    assert sum(b["used"] for b in stack.engine.bank_stats()) == 2
    cache.close()


@pytest.mark.parametrize("policy, survives", [("lfu", True), ("lru", False)])
def test_lfu_keeps_a_hot_task_that_lru_evicts(registry, tiny_backbone, policy, survives):
    from petl_platform.serving.models import TaskModelCache

    for t in ("hot", "a", "b", "c"):
        _register(registry, tiny_backbone, t)
    per_task = _lora_bytes(tiny_backbone)
    cache = TaskModelCache(tiny_backbone, registry, capacity_mb=2.5 * per_task / 2**20, policy=policy)
    for _ in range(5):
        cache.get("hot")  # hot: looked up 5 times, then three one-off tasks
    for t in ("a", "b", "c"):
        cache.get(t)
    assert ("hot" in cache.entries) is survives and cache.snapshot()["resident"] == 2
    with pytest.raises(Exception, match="eviction policy must be one of lru, lfu"):
        TaskModelCache(tiny_backbone, registry, policy="fifo")


def test_host_tier_keeps_evicted_adapters_and_promotes_them_without_a_download(registry, tiny_backbone, monkeypatch):
    import petl_platform.serving.models as models

    for i in range(3):
        _register(registry, tiny_backbone, f"t{i}")
    per_task = _lora_bytes(tiny_backbone)
    cache = models.TaskModelCache(tiny_backbone, registry, capacity_mb=1.5 * per_task / 2**20,
                                  host_mb=2.5 * per_task / 2**20)
    for t in ("t0", "t1", "t2"):
        cache.get(t)
    assert list(cache.entries) == ["t2"] and list(cache.host) == ["t0", "t1"]
    monkeypatch.setattr(models, "fetch_adapter", lambda *a, **k: pytest.fail("a host hit must not download"))
    assert cache.get("t0").task == "t0" and cache.stats["host_hits"] == 1 and cache.stats["loads"] == 3
    assert list(cache.entries) == ["t0"] and set(cache.host) == {"t1", "t2"}


def test_a_hung_store_delays_only_the_task_being_loaded(registry, tiny_backbone, monkeypatch):
    """One task's download hangs: the resident task answers at once, another cold task loads, and
    the hung one's callers get a 503 after the load timeout; once the store answers it loads."""
    import petl_platform.serving.models as models

    for t in ("hot", "cold", "stuck"):
        _register(registry, tiny_backbone, t)
    release, real = threading.Event(), models.fetch_adapter

    def fetch(settings, ref, dst=None):
        if ref.startswith("stuck"):
            release.wait(30)
        return real(settings, ref, dst)

    monkeypatch.setattr(models, "fetch_adapter", fetch)
    cache = models.TaskModelCache(tiny_backbone, registry, load_timeout_s=0.5)
    cache.get("hot")
    pending = cache.load("stuck")  # the load starts and hangs on its own loader thread
    t0 = time.perf_counter()
    assert cache.get("hot").task == "hot"
    hot_s = time.perf_counter() - t0
    assert cache.get("cold", timeout=20).task == "cold"  # a cold load beside the hung one
    with pytest.raises(ServeError) as e:
        cache.get("stuck")
    assert e.value.status == 503 and "still loading" in str(e.value)
    assert hot_s < 0.5 and not pending.done()
    release.set()
    assert pending.result(20).task == "stuck" and cache.get("stuck").version == 1


def test_concurrent_requests_for_a_cold_task_share_one_load(registry, tiny_backbone):
    import asyncio

    from petl_platform.serving.models import TaskModelCache

    _register(registry, tiny_backbone, "t0")
    cache = TaskModelCache(tiny_backbone, registry)

    async def many():
        return await asyncio.gather(*(cache.aget("t0") for _ in range(8)))

    got = asyncio.run(many())
    assert len({id(e) for e in got}) == 1 and cache.stats["loads"] == 1


def test_alias_move_is_prefetched_off_the_request_path_even_to_another_method(registry, tiny_backbone, monkeypatch):
    import petl_platform.serving.models as models

    _register(registry, tiny_backbone, "t0", "linear")
    _register(registry, tiny_backbone, "t1", "lora")
    cache = models.TaskModelCache(tiny_backbone, registry)
    assert cache.get("t0").method == "linear"
    _register(registry, tiny_backbone, "t0", "lora", rank=2)  # the alias moves to another method
    assert cache.get("t0").version == 1  # a request never checks the alias itself

    # while the alias check hangs (a stuck registry), the resident tasks answer at once
    release, real = threading.Event(), models.show_model

    def slow_show(settings, ref):
        release.wait(30)
        return real(settings, ref)

    monkeypatch.setattr(models, "show_model", slow_show)
    refresher = threading.Thread(target=cache.refresh_once)
    refresher.start()
    t0 = time.perf_counter()
    assert cache.get("t1").task == "t1" and cache.get("t0").version == 1
    assert time.perf_counter() - t0 < 0.5
    release.set()
    refresher.join(30)
    new = cache.get("t0")
    assert (new.version, new.method) == (2, "lora") and cache.stats["refreshes"] == 1


def test_a_request_is_served_the_version_it_was_routed_by_not_a_stale_alias(registry, tiny_backbone, monkeypatch):
    """The ingress routes a task by the version its catalog saw and sends that version along. A cold
    task loads that version, even where the store's fetcher resolves the alias stale (a node cache);
    a resident task at another version asks the registry once per ``refresh_s`` and serves its answer."""
    import petl_platform.serving.models as models
    from petl_platform.errors import PetlError

    _register(registry, tiny_backbone, "t0", "linear")
    _register(registry, tiny_backbone, "t0", "lora", rank=2)  # the alias moves to v2, another method
    real = models.fetch_from_registry
    stale = models.TaskModelCache(tiny_backbone, registry, refresh_s=3600,  # its alias look-ups still say v1
                                  fetch=lambda ref: real(registry, ref.replace("@champion", "/1")))
    assert stale.get("t0").version == 1
    stale.drop("t0")
    got = stale.get("t0", version=2)
    assert (got.version, got.method) == (2, "lora")

    _register(registry, tiny_backbone, "t1", "linear")
    cache = models.TaskModelCache(tiny_backbone, registry, refresh_s=3600)
    assert cache.get("t1", version=1).version == 1
    _register(registry, tiny_backbone, "t1", "lora", rank=2)
    assert cache.get("t1").version == 1  # no version given: the resident one, no registry call
    new = cache.get("t1", version=2)  # routed by v2: resident v1 is checked and replaced
    assert (new.version, new.method) == (2, "lora") and cache.stats["rechecks"] == 1
    assert cache.stats["refreshes"] == 1
    # a stale router still names v1: the registry says v2, v2 answers, and it is asked once
    assert cache.get("t1", version=1).version == 2 and cache.stats["rechecks"] == 2
    assert cache.get("t1", version=1).version == 2 and cache.stats["rechecks"] == 2

    # routed by a version this replica refuses (another backbone's): the resident one keeps serving
    _register(registry, _other_backbone(), "t1")  # v3, and the alias moves to it
    assert cache.get("t1", version=3).version == 2 and cache.stats["refused"] == 1
    assert cache.get("t1", version=3).version == 2 and cache.stats["rechecks"] == 3  # asked once

    def down(settings, ref):
        raise PetlError("registry unreachable")

    monkeypatch.setattr(models, "show_model", down)
    assert cache.get("t1", version=7).version == 2  # the check fails: the resident version keeps serving
    assert cache.get("t1", version=7).version == 2 and cache.stats["rechecks"] == 4  # and is not retried
    assert not cache.loading                                                       # per request


def test_refused_version_keeps_the_old_one_and_a_fixed_alias_clears_the_refusal(registry, tiny_backbone):
    from petl_platform.serving.models import TaskModelCache
    from petl_platform.tracking.runs import promote

    _register(registry, tiny_backbone, "t0")
    other = _other_backbone()
    _register(registry, other, "t0")  # v2: another fingerprint, refused
    promote(registry, "t0", "1")
    cache = TaskModelCache(tiny_backbone, registry, refresh_s=3600)
    assert cache.get("t0").version == 1
    promote(registry, "t0", "2")
    cache.refresh_once()
    assert cache.get("t0").version == 1 and cache.stats["refused"] == 1  # still serving v1
    cache.drop("t0")
    with pytest.raises(ServeError) as e:
        cache.get("t0")
    assert e.value.status == 503 and "fingerprint" in str(e.value)
    promote(registry, "t0", "1")
    cache.refresh_once()  # the alias no longer points at the refused version
    assert cache.get("t0").version == 1


def _other_backbone():
    import torch

    from petl_platform import create_backbone

    torch.manual_seed(7)
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)


def test_budget_needs_the_curve_stored_in_the_artifact(registry, tiny_backbone8):
    from petl_platform.serving.models import TaskModelCache

    _register(registry, tiny_backbone8, "dyn", "dyn_linear")
    entry = TaskModelCache(tiny_backbone8, registry).get("dyn")
    entry.model.budget_thresholds = {}  # an artifact saved before the curve was stored
    with pytest.raises(ServeError) as e:
        entry.thresholds_for(0.5)
    assert e.value.status == 400 and "explicit threshold" in str(e.value)
    entry.model.budget_thresholds = {0.3: [0.9, 0.9, 0.9], 0.6: [0.5, 0.5, 0.5]}
    assert entry.thresholds_for(0.7) == [0.5, 0.5, 0.5] and entry.thresholds_for(0.1) == [0.9, 0.9, 0.9]


# ---------------------------------------------------------------------------------- the catalog
def test_catalog_lists_the_alias_filters_and_finds_late_registrations(registry, tiny_backbone):
    from mlflow import MlflowClient

    from petl_platform.serving.catalog import Catalog

    _register(registry, tiny_backbone, "team-a-digits", "lora")
    _register(registry, tiny_backbone, "team-b-shapes", "linear")
    cat = Catalog(registry)
    cat.refresh()
    assert cat.tasks() == ["team-a-digits", "team-b-shapes"]
    row = cat.rows["team-a-digits"]
    assert (row["method"], row["runtime"], row["version"], row["alias"]) == ("lora", "per_row_adapter", 1, "champion")
    _register(registry, tiny_backbone, "team-a-late", "dyt")  # after the refresh
    assert "team-a-late" not in cat.rows and cat.lookup("team-a-late")["runtime"] == "token_dispatch"
    assert cat.lookup("never-registered") is None
    _register(registry, tiny_backbone, "team-b-shapes", "lora")  # the alias moves to another method
    assert cat.lookup("team-b-shapes")["method"] == "linear"  # the listed row, until a refresh ...
    assert cat.lookup("team-b-shapes", fresh=True)["method"] == "lora"  # ... or a fresh look-up
    assert cat.rows["team-b-shapes"]["version"] == 2
    _register(registry, tiny_backbone, "team-b-shapes", "dyt")
    cat.refresh()
    assert (cat.rows["team-b-shapes"]["method"], cat.rows["team-b-shapes"]["version"]) == ("dyt", 3)

    narrowed = Catalog(registry, pattern="team-a-*")
    narrowed.refresh()
    assert narrowed.tasks() == ["team-a-digits", "team-a-late"] and narrowed.lookup("team-b-shapes") is None
    MlflowClient(registry.tracking_uri).set_registered_model_tag("team-b-shapes", "tenant", "b")
    tagged = Catalog(registry, tag="tenant=b")
    tagged.refresh()
    assert tagged.tasks() == ["team-b-shapes"]
    assert Catalog(registry, alias="staging").lookup("team-a-digits") is None  # no such alias


def test_catalog_reads_the_method_from_the_artifact_when_the_version_has_no_tag(registry, tiny_backbone):
    import tempfile

    from petl_platform.methods import build_model
    from petl_platform.serving.catalog import Catalog
    from petl_platform.tracking.artifacts import save_adapter
    from petl_platform.tracking.runs import RunLogger, register_adapter

    with tempfile.TemporaryDirectory() as d:
        save_adapter(build_model("adapter", tiny_backbone, 2), d, task="manual", classes=["x", "y"])
        with RunLogger(registry, "manual") as run:
            run.log_artifacts(d, "adapter")
    register_adapter(registry, run.run_id, "manual")  # no method tag
    cat = Catalog(registry)
    cat.refresh()
    assert cat.rows["manual"]["method"] == "adapter" and cat.rows["manual"]["classes"] == ["x", "y"]


def test_catalog_keeps_its_rows_when_the_registry_fails(registry, tiny_backbone, monkeypatch):
    import dataclasses

    from petl_platform.errors import PetlError
    from petl_platform.serving.catalog import Catalog
    from platform_stack import free_port

    _register(registry, tiny_backbone, "t0")
    cat = Catalog(registry)
    cat.refresh()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cat.settings = dataclasses.replace(registry, tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens
    cat.refresh()
    assert cat.tasks() == ["t0"] and cat.last_error
    with pytest.raises(PetlError):
        cat.lookup("t1")  # a fault, not "unknown": the ingress answers 503, not 404
    with pytest.raises(PetlError):
        Catalog(registry, tag="no-equals-sign")

"""The trainer's own bookkeeping (``cluster.trainer``), without a cluster: claims, their lapse,
idle exit, the idle setting, and a job's checkpoints in storage. The trainer on a real cluster
(reuse, restarts, interruption, a stopped job) is in test_ray_training.py and test_ray_jobs.py."""

import time

import pytest

from petl_platform.cluster import trainer as tr
from petl_platform.errors import PetlError


@pytest.fixture
def fast(monkeypatch):
    ended = []
    monkeypatch.setattr(tr, "CLAIM_TTL_S", 0.3)
    monkeypatch.setattr(tr, "WATCH_S", 0.05)
    monkeypatch.setattr(tr.Trainer, "_end", lambda self: ended.append(self))
    return ended


def _until(cond, timeout=5.0) -> bool:
    """Whether ``cond()`` came true within ``timeout`` (called until it does, and not after)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_one_claim_at_a_time_and_a_claim_whose_job_never_starts_lapses(fast):
    t = tr.Trainer(idle_s=3600)
    assert t.claim() and not t.claim() and not t.retire()
    assert _until(t.claim), "the claim never lapsed"  # the command that claimed it died before fit
    t._start()  # its job starts: no lapse while it runs
    time.sleep(0.5)
    assert not t.claim() and not fast


def test_an_idle_trainer_ends_itself_and_takes_no_job_meanwhile(fast):
    t = tr.Trainer(idle_s=0.2)
    assert _until(lambda: fast == [t]), "the idle trainer never ended"
    assert not t.claim()


def test_a_job_whose_claim_lapsed_and_was_taken_does_not_start(fast):
    t = tr.Trainer(idle_s=3600)
    assert t.claim()
    assert _until(lambda: t._claimed is None)
    assert t.claim()  # another job's claim
    t._claimed = None  # ... whose job has started
    with pytest.raises(RuntimeError, match="lapsed"):
        t._start()


@pytest.mark.parametrize("raw, expected", [(None, 300.0), ("0", 0.0), ("45.5", 45.5)])
def test_idle_setting(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("PETL_TRAINER_IDLE_S", raising=False)
    else:
        monkeypatch.setenv("PETL_TRAINER_IDLE_S", raw)
    assert tr.idle_seconds() == expected


@pytest.mark.parametrize("raw", ["soon", "-1"])
def test_bad_idle_setting_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv("PETL_TRAINER_IDLE_S", raw)
    with pytest.raises(PetlError, match="PETL_TRAINER_IDLE_S"):
        tr.idle_seconds()


def test_checkpoints_in_storage_and_the_latest_one(tmp_path):
    ck = tr.Checkpoints(str(tmp_path / "store"), "job")
    assert ck.latest() is None
    for epoch in (1, 2, 10):
        src = tmp_path / f"local{epoch}"
        (src / "adapter").mkdir(parents=True)
        (src / "trial.json").write_text(str(epoch))
        (src / "adapter" / "w.bin").write_bytes(bytes([epoch]))
        saved = ck.save(str(src), epoch)
        assert saved.path == str(tmp_path / "store" / "job" / f"checkpoint_{epoch:06d}")
    latest = ck.latest()
    with latest.as_directory() as d:
        assert (tmp_path / d / "trial.json").read_text() == "10"
        assert (tmp_path / d / "adapter" / "w.bin").read_bytes() == bytes([10])

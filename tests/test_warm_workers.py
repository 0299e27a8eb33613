"""Warm workers (``cluster.connect.ensure_ray(warm=True)``): a local cluster's idle workers import
the platform before they take work, and a Tune trial actor, its ``runtime_env`` cleaned by
``prepare_tune_actors``, starts on one of them instead of a new process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from petl_platform.cluster.connect import warm_workers

BENCH = Path(__file__).resolve().parents[1] / "bench"

SCRIPT = """
import json, os, sys
sys.path.insert(0, {bench!r})
import ray
from ray.tune.execution import class_cache
from warm import wait_for_idle_workers
from petl_platform.cluster.connect import WARM_MODULES, ensure_ray, prepare_tune_actors

class Probe:
    def info(self):
        return os.getpid(), [m for m in WARM_MODULES if m in sys.modules]

ensure_ray(num_cpus=2, warm=True)
idle = wait_for_idle_workers(2)
prepare_tune_actors()
trial = class_cache._ActorClassCache().get(Probe).options(num_cpus=1).remote()  # as Tune creates a trial
pid, loaded = ray.get(trial.info.remote())
# Tune's own runtime_env, as it was before prepare_tune_actors: a new process
other = ray.remote(Probe).options(num_cpus=1, runtime_env={{"env_vars": {{"PL_DISABLE_FORK": "1"}}}}).remote()
other_pid, _ = ray.get(other.info.remote())
print("RESULT " + json.dumps({{"idle": idle, "pid": pid, "loaded": loaded, "other_pid": other_pid}}))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_trial_actor_starts_on_a_warm_worker(tmp_path):
    from petl_platform.cluster.connect import WARM_MODULES

    p = subprocess.run([sys.executable, "-c", SCRIPT.format(bench=str(BENCH))], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert len(got["idle"]) >= 2
    assert got["pid"] in got["idle"]  # an idle worker that was there before: no new process
    assert got["loaded"] == list(WARM_MODULES)  # it had imported the platform before it took the actor
    assert got["other_pid"] not in got["idle"]  # another runtime_env cannot use it


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("off", False), ("no", False)])
def test_warm_workers_can_be_turned_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("PETL_WARM_WORKERS", raising=False)
    else:
        monkeypatch.setenv("PETL_WARM_WORKERS", value)
    assert warm_workers() is on

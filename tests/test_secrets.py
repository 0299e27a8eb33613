"""Secrets never travel in a Ray runtime_env: `petl submit` to a local cluster with a marker
AWS_SECRET_ACCESS_KEY; the marker must not appear in any file Ray wrote (session logs, job
data, runtime_env resources) or in any MLflow param or tag, while the job still reached S3."""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from platform_stack import platform_stack, s3_keys
from petl_platform.errors import PetlError
from petl_platform.cluster.jobs import submit
from petl_platform.tracking.settings import SECRET_ENV_VARS, forwarded_env


def test_forwarded_env_holds_no_credentials(monkeypatch):
    for k in SECRET_ENV_VARS:
        monkeypatch.setenv(k, "marker")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = forwarded_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "AWS_SECRET_ACCESS_KEY" in SECRET_ENV_VARS and not set(env) & SECRET_ENV_VARS
    assert "marker" not in env.values()


def test_tune_trials_get_no_credentials_in_their_runtime_env(monkeypatch):
    """Ray Tune copies the driver's AWS_* variables into each trial actor's runtime_env (Ray 2.60),
    and adds PL_DISABLE_FORK; petl's sweeps and one-worker trains take both out first."""
    from ray.tune.execution import class_cache

    from petl_platform.cluster.connect import prepare_tune_actors

    class Trainable:
        pass

    for k in SECRET_ENV_VARS:
        monkeypatch.setenv(k, "marker")
    # Tune's list as Ray ships it (an earlier sweep in this process has already filtered it),
    # restored after the test
    shipped = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                              "AWS_SESSION_TOKEN"}
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", shipped)
    assert "marker" in str(class_cache._ActorClassCache().get(Trainable)._default_options)  # what Tune does
    monkeypatch.setattr(class_cache, "DEFAULT_ENV_VARS", dict(class_cache.DEFAULT_ENV_VARS, PL_DISABLE_FORK="1"))
    for k in class_cache.ENV_VARS_TO_PROPAGATE - SECRET_ENV_VARS:  # no Tune/Train setting in this shell
        monkeypatch.delenv(k, raising=False)
    prepare_tune_actors()
    options = class_cache._ActorClassCache().get(Trainable)._default_options
    assert "marker" not in str(options)
    # and nothing else: the trial's runtime_env is the job's, so it can start on a warm worker
    assert not options["runtime_env"].get("env_vars")


def test_submit_refuses_credentials_in_env():
    with pytest.raises(PetlError, match="AWS_SECRET_ACCESS_KEY: credentials are not sent with a job"):
        submit("train", ["--task", "digits-1k"], address="http://127.0.0.1:1",
               env={"AWS_SECRET_ACCESS_KEY": "x", "PETL_CACHE": "/tmp"})


@pytest.mark.slow
def test_local_submit_keeps_the_secret_out_of_ray_logs_and_mlflow(tmp_path):
    import mlflow

    marker = f"petl-marker-{uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="petl-ray-", dir="/tmp")  # short: Ray's unix sockets live here
    try:
        with platform_stack(tmp_path) as st:
            env = {**os.environ, "AWS_SECRET_ACCESS_KEY": marker, "RAY_TMPDIR": ray_tmp,
                   "PETL_STORAGE_PATH": "s3://petl-test/ray_results"}  # checkpoints through S3 on the worker
            p = subprocess.run([sys.executable, "-m", "petl_platform.cli", "submit", "train", "--task", "digits-1k",
                                "--method", "linear", "--backbone", st["backbone"], "--epochs", "1", "--workers", "1"],
                               capture_output=True, text=True, timeout=600, env=env)
            assert p.returncode == 0, p.stderr[-3000:]
            assert "SUCCEEDED" in p.stdout
            # the job reached S3 with credentials from the cluster's environment
            assert any(k.startswith("ray_results/") for k in s3_keys(st["s3"]))
            assert any(k.startswith("mlflow/") and "adapter" in k for k in s3_keys(st["s3"]))

            client = mlflow.MlflowClient(st["settings"].tracking_uri)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            assert runs and all(r.info.status == "FINISHED" for r in runs)
            for r in runs:
                for where, values in (("param", r.data.params), ("tag", r.data.tags)):
                    leaked = [k for k, v in values.items() if marker in str(v) or marker in k]
                    assert not leaked, f"run {r.info.run_id}: {where}s {leaked} hold the secret"
        files = [f for f in Path(ray_tmp).rglob("*") if f.is_file() and not f.is_symlink()]
        assert any(f.name == "runtime_env_agent.log" for f in files)  # the logs that used to hold it
        leaked = [str(f) for f in files if marker.encode() in f.read_bytes()]
        assert not leaked, f"the secret is in {leaked[:5]}"
        assert marker not in p.stdout + p.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

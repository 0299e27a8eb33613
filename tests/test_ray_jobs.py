"""Integration: `petl submit` to a local cluster's dashboard (the Ray Jobs API), following the
job's logs to the end; `petl jobs list|logs`."""

import os

import pytest

from platform_stack import platform_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    from petl_platform.cluster.connect import ensure_ray

    with platform_stack(tmp_path_factory.mktemp("jobs")) as st:
        ctx = ensure_ray(num_cpus=2)  # with its dashboard on 127.0.0.1: the Jobs API
        try:
            yield {**st, "address": f"http://{ctx.dashboard_url}"}
        finally:
            ray.shutdown()


def test_submit_train_job_follows_logs_to_success(cluster, petl_cli):
    _petl = petl_cli  # the CLI runs in this process (conftest); the job runs in the cluster as ever
    p = _petl("submit", "train", "--task", "digits-1k", "--method", "linear", "--backbone", cluster["backbone"],
              "--epochs", "2", "--workers", "2", "--address", cluster["address"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "submitted petl-train-" in p.stdout and "SUCCEEDED" in p.stdout
    assert "on 2 Ray Train workers: test accuracy" in p.stdout  # the job's own output, followed live
    job_id = p.stdout.split("submitted ", 1)[1].split()[0]

    listed = _petl("jobs", "list", "--address", cluster["address"])
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = _petl("jobs", "logs", job_id, "--address", cluster["address"])
    assert "test accuracy" in logs.stdout
    missing = _petl("jobs", "logs", "no-such-job", "--address", cluster["address"])
    assert missing.returncode == 2 and missing.stderr.startswith("petl: error:")


def test_submit_refuses_bad_arguments_before_submitting(cluster, petl_cli):
    p = petl_cli("submit", "sweep", "--task", "digits-1k", "--method", "lora", "--space", "p_m=choice(0.1)",
                 "--address", cluster["address"])
    assert p.returncode == 2 and "no hyperparameter 'p_m'" in p.stderr and "submitted" not in p.stdout


def test_a_stopped_job_stops_its_training_on_the_trainer(cluster):
    """`ray job stop` ends a one-worker `petl train` job's driver; its trainer (a detached actor that
    outlives jobs) notices the job has ended, stops the training at its next epoch, and marks the
    MLflow run FAILED with the reason, rather than training on for nobody."""
    import time

    import mlflow

    from petl_platform.cluster.jobs import stop_job, submit
    from petl_platform.cluster.trainer import release_idle_trainers

    job = submit("train", ["--task", "digits-1k", "--method", "linear", "--backbone", cluster["backbone"],
                           "--epochs", "60", "--batch-size", "16", "--name", "stop-me"],
                 address=cluster["address"], wait=False, out=open(os.devnull, "w"))
    c, deadline = mlflow.MlflowClient(cluster["settings"].tracking_uri), time.time() + 240

    def run():
        exp = c.get_experiment_by_name("petl")
        found = c.search_runs([exp.experiment_id], "tags.`petl.job` = 'stop-me'") if exp else []
        return found[0] if found else None

    while time.time() < deadline and not (run() and "val_accuracy" in run().data.metrics):
        time.sleep(1)
    assert run() is not None and "val_accuracy" in run().data.metrics, "the job never finished an epoch"
    assert stop_job(cluster["address"], job["job_id"])
    while time.time() < deadline and run().info.status == "RUNNING":
        time.sleep(1)
    r = run()
    assert r.info.status == "FAILED" and "has ended" in r.data.tags["petl.failure"], r.data.tags
    assert max(m.step for m in c.get_metric_history(r.info.run_id, "val_accuracy")) < 60
    while time.time() < deadline and not release_idle_trainers():  # idle again: its job did not go on
        time.sleep(0.5)
    assert time.time() < deadline, "the trainer never became idle"

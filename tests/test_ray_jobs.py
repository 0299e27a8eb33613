"""Integration: `petl submit` to a local cluster's dashboard (the Ray Jobs API), following the
job's logs to the end; `petl jobs list|logs`."""

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

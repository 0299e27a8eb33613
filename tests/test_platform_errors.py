"""Bad input to the training platform fails up front, in one line, before Ray or a trial starts;
a run that fails later is marked FAILED in MLflow and keeps what it logged."""

import time

import mlflow
import pytest

from petl_platform.cli import main
from petl_platform.errors import PetlError
from petl_platform.methods import get_method, list_methods
from petl_platform.tracking.runs import RunLogger
from petl_platform.tracking.settings import TrackingSettings
from petl_platform.training.spec import check_address
from petl_platform.training.space import default_space, parse_space
from petl_platform.cluster.tune import to_tune
from platform_stack import free_port, platform_stack, sqlite_store


@pytest.mark.parametrize("items, message", [
    (["p_m=chice(0.1)"], r"expected NAME=DIST\(ARGS\)"),
    (["p_m choice(0.1)"], r"expected NAME=DIST\(ARGS\)"),
    (["p_m=uniform(0.5)"], "wrong number of arguments"),
    (["p_m=uniform(0.5,0.1)"], "low must be below high"),
    (["p_m=choice(a b)"], "arguments must be literals"),
    (["depth=choice(1,2)"], "has no hyperparameter 'depth'"),
    (["p_m=choice(0.1,1.5)"], "p_m"),  # the method's own config rejects a rate above 1
])
def test_bad_search_space_is_one_clear_error(items, message):
    with pytest.raises(PetlError, match=message):
        parse_space(items, "dyn_lora")


@pytest.mark.parametrize("method", list_methods())
def test_every_default_space_is_valid_for_its_method(method):
    space = parse_space(default_space(method, depth=12), method)
    assert space, method
    if get_method(method).runtime == "early_exit":
        # p_m (the exit heads' gradient mask) always acts; p_shallow / p_deep only where the base
        # has adapter modules to drop (over a linear probe they would change nothing)
        has_modules = bool(get_method(method).bank.modules)
        wanted = {"p_shallow", "p_deep", "p_m"} if has_modules else {"p_m"}
        assert wanted <= set(space)
        assert has_modules or not {"p_shallow", "p_deep"} & set(space)
    assert set(to_tune(space)) == set(space)


def test_space_values_parse_to_tune_domains():
    space = parse_space(["p_shallow=uniform(0.1,0.7)", "p_m=grid(0.0,0.1)", "lr=loguniform(1e-4,1e-2)"], "dyn_lora")
    assert space["p_m"] == ("grid", [0.0, 0.1]) and space["lr"] == ("loguniform", [1e-4, 1e-2])
    tuned = to_tune(space)
    assert tuned["p_m"] == {"grid_search": [0.0, 0.1]} and 0.1 <= tuned["p_shallow"].sample() <= 0.7


def test_grids_come_in_a_seeded_order_for_the_stopping_schedulers():
    lrs = [round(1e-4 * 1.5 ** i, 8) for i in range(9)]
    space = {"lr": ("grid", lrs), "p_m": ("grid", [0.0, 0.1, 0.2])}
    assert to_tune(space)["lr"] == {"grid_search": lrs}  # FIFO: as written
    orders = [to_tune(space, seed)["lr"]["grid_search"] for seed in (0, 0, 1)]
    assert orders[0] == orders[1] and sorted(orders[0]) == lrs and sorted(orders[2]) == lrs
    assert orders[0] != lrs and orders[0] != orders[2]  # shuffled, and by the seed
    assert sorted(to_tune(space, 0)["p_m"]["grid_search"]) == [0.0, 0.1, 0.2]


def test_unreachable_cluster_fails_fast():
    t0 = time.time()
    with pytest.raises(PetlError, match="cannot reach Ray cluster"):
        check_address(f"127.0.0.1:{free_port()}")
    with pytest.raises(PetlError, match="petl submit"):
        check_address("http://127.0.0.1:8265")
    assert time.time() - t0 < 10


def test_cli_errors_are_one_line(capsys):
    port = free_port()
    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert main(["sweep", "--task", "digits-1k", "--method", "dyn_lora", "--space", "p_m=oops"]) == 2
    assert main(["train", "--task", "digits-1k", "--address", f"127.0.0.1:{port}"]) == 2
    assert main(["sweep", "--task", "nope", "--method", "lora"]) == 2
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("petl: error: ")]
    assert len(err) == 4 and "Traceback" not in text, text
    assert "Jobs API" in err[0] and "unknown task 'nope'" in err[3]


def test_s3_store_problems_are_caught_up_front(tmp_path, monkeypatch):
    with platform_stack(tmp_path) as st:
        settings = st["settings"]
        settings.prepare()  # the bucket exists: fine
        with pytest.raises(PetlError, match="bucket 'missing' does not exist"):
            TrackingSettings(settings.tracking_uri, "s3://missing/mlflow", settings.storage_path).prepare()
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        t0 = time.time()
        with pytest.raises(PetlError, match="unreachable"):
            settings.prepare()
        assert time.time() - t0 < 30
    with pytest.raises(PetlError, match="tracking server .* is unreachable"):
        TrackingSettings(f"http://127.0.0.1:{free_port()}", None, str(tmp_path)).prepare()


def test_failed_run_is_marked_failed_and_keeps_its_metrics(tmp_path):
    settings = TrackingSettings(sqlite_store(tmp_path / "m.db", str(tmp_path / "art")), str(tmp_path / "art"),
                                str(tmp_path / "ray"))
    settings.prepare()
    with pytest.raises(ValueError):
        with RunLogger(settings, "petl", run_name="boom") as run:
            run.log_metrics({"val_accuracy": 0.5}, step=1)
            raise ValueError("disk full")
    got = mlflow.MlflowClient(settings.tracking_uri).get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["petl.failure"] == "ValueError: disk full"
    assert got.data.metrics["val_accuracy"] == 0.5


def test_budget_for_a_static_method_fails_before_training(capsys):
    for cmd in ("train", "sweep"):
        assert main([cmd, "--task", "digits-1k", "--method", "lora", "--budget", "0.5"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("petl: error: ")]
    assert len(err) == 2 and all("--budget applies to early-exit methods" in line for line in err)


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "-0.5", "0", "2"])
@pytest.mark.parametrize("cmd", [["train"], ["train", "--local"], ["sweep"], ["submit", "train"]])
def test_bad_budget_fails_before_any_cluster_starts(cmd, budget, capsys, monkeypatch):
    import petl_platform.cluster.connect as distributed

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a bad --budget")

    monkeypatch.setattr(distributed, "ensure_ray", no_cluster)
    assert main([*cmd, "--task", "digits-1k", "--method", "dyn_lora", f"--budget={budget}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("petl: error: --budget is the fraction of full-depth FLOPs"), err
    assert f"got {float(budget)}" in err[0]


def test_ray_failures_are_classified_by_type_not_by_traceback_text():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from petl_platform.cluster.connect import ray_error, user_error

    source_line = 'Traceback (most recent call last):\n  raise PetlError(f"--budget must be {x}")\npetl_platform.errors.PetlError: x'
    user = PetlError("budget is a fraction of the full-depth FLOPs, e.g. 0.5; got nan")
    failed = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(user, source_line)})
    assert user_error(failed) is user and str(ray_error(failed)) == str(user)
    dual = RayTaskError("trial", source_line, user).as_instanceof_cause()  # also an instance of PetlError
    assert user_error(dual) is user and str(ray_error(dual)) == str(user)

    oom = WorkerGroupError("rank 1 died", {1: UserExceptionWithTraceback(MemoryError("CUDA out of memory"), source_line)})
    assert user_error(oom) is None  # not the user's error: retried
    assert str(ray_error(oom)) == "training failed: MemoryError: CUDA out of memory"
    # a message that merely mentions PetlError is not one
    assert user_error(RuntimeError("PetlError: looks like one")) is None


RAY_NO_TIMM = """Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
  File "/tmp/ray/session_2026-12-03_10-12-31_402311_7/runtime_resources/working_dir_files/_ray_pkg_5c0ffee1/jobs/finetune.py", line 6, in <module>
    from petl_platform.cli import main
  File "/tmp/ray/session_2026-12-03_10-12-31_402311_7/runtime_resources/py_modules_files/_ray_pkg_8badf00d/petl_platform/__init__.py", line 4, in <module>
    from .backbones import SHIPPED, create_backbone, fingerprint  # noqa: E402
  File "/tmp/ray/session_2026-12-03_10-12-31_402311_7/runtime_resources/py_modules_files/_ray_pkg_8badf00d/petl_platform/backbones/factory.py", line 16, in <module>
    import timm
ModuleNotFoundError: No module named 'timm'
"""


def test_a_job_on_a_cluster_without_the_projects_dependencies_says_what_it_needs():
    from petl_platform.cluster.jobs import job_failure_message

    msg = job_failure_message("petl-train-1", "FAILED", RAY_NO_TIMM, RAY_NO_TIMM.split(":\n", 1)[1])
    assert msg.startswith("job petl-train-1 FAILED: the cluster's Python has no module 'timm' (ModuleNotFoundError)")
    assert "infra/docker/Dockerfile" in msg and ".venv/bin/ray start --head" in msg and "runtime_env `pip`" in msg
    assert "\n" not in msg
    # the logs alone (no message) are enough; a version mismatch is named as such
    assert "no module 'timm'" in job_failure_message("j", "FAILED", None, RAY_NO_TIMM)
    old = "ImportError: cannot import name 'Array' from 'mlflow.types.schema' (/usr/lib/python3/mlflow/types/schema.py)"
    msg = job_failure_message("j", "FAILED", f"Job entrypoint command failed with exit code 1:\n{old}\n")
    assert "'mlflow.types.schema' has no 'Array' (ImportError)" in msg and "constraints.txt" in msg
    # the project's own code missing is another problem; any other failure keeps its last line
    assert "did not reach the job" in job_failure_message("j", "FAILED", "ModuleNotFoundError: No module named 'jobs'")
    assert job_failure_message("j", "FAILED", "...\npetl: error: unknown task 'x'\n") == "job j FAILED: petl: error: unknown task 'x'"
    assert job_failure_message("j", "STOPPED", None, "") == "job j STOPPED: see its logs"


def test_petl_submit_reports_a_missing_module_on_the_cluster(monkeypatch, capsys):
    """`petl submit ... --address` against a fake Jobs API whose job fails importing timm."""
    import types

    from petl_platform.cluster import jobs

    class FakeJobs:
        def submit_job(self, **kw):
            return kw["submission_id"]

        async def tail_job_logs(self, job_id):
            yield RAY_NO_TIMM.split(":\n", 1)[1]

        def get_job_status(self, job_id):
            return "FAILED"

        def get_job_info(self, job_id):
            return types.SimpleNamespace(message=RAY_NO_TIMM)

        def get_job_logs(self, job_id):
            return RAY_NO_TIMM.split(":\n", 1)[1]

    monkeypatch.setattr(jobs, "connect", lambda address: FakeJobs())
    rc = main(["submit", "train", "--task", "digits-1k", "--method", "linear", "--address", "http://head:8265"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("petl: error: job petl-train-") and "\n" not in err
    assert "FAILED: the cluster's Python has no module 'timm'" in err and ".venv/bin/ray start --head" in err

"""Integration: a PetlError raised on a Ray worker (here: a JPEG cut after its header, which the
driver's header scan passes and only the worker's decoding sees) is not retried by Ray Train or Ray Tune, even with --max-failures 2, and the error
printed is the PetlError's message, not a line of its traceback."""

import mlflow
import numpy as np
import pytest
from PIL import Image

from petl_platform.errors import PetlError
from petl_platform.training.spec import SweepSpec, TrainSpec
from platform_stack import platform_stack
from test_spec import truncated_jpeg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray

    from petl_platform.cluster.connect import ensure_ray

    root = tmp_path_factory.mktemp("failures")
    with platform_stack(root) as st:
        ensure_ray(num_cpus=2)
        try:
            yield {**st, "task": _broken_folder_task(root / "broken")}
        finally:
            ray.shutdown()


def _broken_folder_task(root):
    """An ImageFolder tree with one truncated JPEG: the driver's up-front check (every image
    header opens) passes, the worker's decoding fails the same way on every attempt."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    (root / "train" / "b" / "cut.jpg").write_bytes(truncated_jpeg())
    return f"folder:{root}"


def _runs(st, filter_string):
    c = mlflow.MlflowClient(st["settings"].tracking_uri)
    return c.search_runs([e.experiment_id for e in c.search_experiments()], filter_string)


def test_ray_train_does_not_retry_a_petl_error(stack):
    from petl_platform.cluster.train import run_train

    with pytest.raises(PetlError) as err:
        run_train(TrainSpec(task=stack["task"], backbone=stack["backbone"], settings=stack["settings"],
                            train={"epochs": 1}, workers=1, max_failures=2, name="train-corrupt"))
    assert str(err.value).startswith("cannot read image ") and "cut.jpg" in str(err.value)
    assert "raise PetlError" not in str(err.value) and "\n" not in str(err.value)
    runs = _runs(stack, "tags.`petl.job` = 'train-corrupt'")
    assert len(runs) == 1, "the deterministic error was retried"  # one attempt, one MLflow run
    assert runs[0].info.status == "FAILED" and "cannot read image" in runs[0].data.tags["petl.failure"]


def test_ray_tune_does_not_retry_a_petl_error(stack, capfd):
    from petl_platform.data.registry import task_slug
    from petl_platform.cluster.tune import run_sweep

    with pytest.raises(PetlError) as err:
        run_sweep(SweepSpec(tasks=(stack["task"],), backbone=stack["backbone"], settings=stack["settings"],
                            space=("lr=choice(0.01)",), samples=1, epochs=1, scheduler="fifo", max_failures=2,
                            name="corrupt", progress=False))
    msg = str(err.value)
    # progress=False (petl demo's sweep): Tune's own output (its experiment box, the TensorBoard
    # hint) stays off the terminal too
    printed = "".join(capfd.readouterr())
    assert "Configuration for experiment" not in printed and "tensorboard" not in printed.lower(), printed[-2000:]
    assert "every trial of sweep" in msg and "first error: cannot read image " in msg and "raise PetlError" not in msg
    trials = [r for r in _runs(stack, f"tags.`petl.sweep` = 'corrupt-{task_slug(stack['task'])}'")
              if r.data.tags.get("petl.role") != "sweep"]  # the trials' runs, not the parent
    assert len(trials) == 1, "the deterministic error was retried"
    assert trials[0].info.status == "FAILED" and "cannot read image" in trials[0].data.tags["petl.failure"]

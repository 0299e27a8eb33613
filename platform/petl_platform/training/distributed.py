"""Ray glue for training: connect to (or start) a cluster, resolve Ray storage, and run one
fine-tune as a Ray Train ``TorchTrainer`` with N data-parallel workers."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ..errors import PetlError
from ..tracking.settings import forwarded_env

if TYPE_CHECKING:
    from .spec import TrainSpec


def check_address(address: str) -> None:
    """``petl train/sweep --address``: a GCS address (``HOST:6379``), ``auto`` or ``ray://``; fail
    fast when nothing listens there instead of letting ``ray.init`` retry for a minute."""
    if address.startswith(("http://", "https://")):
        raise PetlError(f"{address} is a dashboard (Jobs API) address: use `petl submit ... --address {address}`; "
                        "`--address` here takes HOST:6379, auto or ray://HOST:10001")
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if address.startswith("ray://") else 6379)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise PetlError(f"cannot reach Ray cluster at {host}:{port} ({e.strerror or e}); is `ray start --head` running?") from None
    if not address.startswith("ray://"):  # a GCS: settle token auth now, not in ray.init's retries
        from ..ray_auth import prepare_gcs
        prepare_gcs(f"{host}:{port}")


def in_ray_job() -> bool:
    """Whether this process runs inside a Ray job (or is pointed at a cluster by ``RAY_ADDRESS``):
    ``ensure_ray()`` then connects to that cluster instead of starting one."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True):
    """Connect to ``address``, to the cluster of the Ray job this runs in, or start a local
    cluster. Returns the ``RayContext`` when this call initialised Ray (the caller then shuts it
    down), else None. ``log_to_driver=False`` leaves the workers' and actors' output in Ray's log
    files (``petl demo``: the terminal shows only progress and results)."""
    import ray

    if ray.is_initialized():
        return None
    if address:
        check_address(address)
    in_job = in_ray_job()
    kwargs = {"log_to_driver": log_to_driver, "configure_logging": True, "logging_level": "WARNING"}
    if not in_job:  # inside a Ray job the job's runtime_env already carries the env vars
        # Settings only: credentials come from the cluster's environment. A cluster started
        # here inherits this process's environment; a remote one has its own (Secret, .env).
        kwargs["runtime_env"] = {"env_vars": forwarded_env()}
    if not address and not in_job:
        # The dashboard serves the State API Ray Train's controller polls, and the Jobs API.
        kwargs.update(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        # "local": always a new cluster of our own, never one a stale /tmp/ray/ray_current_cluster names
        return ray.init(address=address or (None if in_job else "local"), **kwargs)
    except ConnectionError as e:
        raise PetlError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')}: {e}") from None
    except ray.exceptions.AuthenticationError:
        from ..ray_auth import auth_error
        raise auth_error(address or os.environ.get("RAY_ADDRESS")) from None


def storage(path: str):
    """``(storage_path, storage_filesystem)`` for Ray: an ``s3://`` path uses the same endpoint
    and credentials as MLflow (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``)."""
    if not path.startswith("s3://"):
        os.makedirs(path, exist_ok=True)
        return path, None
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if not endpoint:
        return path, None
    import pyarrow.fs

    ep = urlparse(endpoint)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme or "http",
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return path[len("s3://"):], fs


# Attributes under which Ray wraps the exception that really happened: RayTaskError.cause,
# Train's WorkerGroupError.worker_failures / ControllerError.controller_failure, and the worker
# side's UserExceptionWithTraceback._base_exc (its str() is the traceback text, not the error).
_WRAPPED = ("cause", "_base_exc", "controller_failure")


def root_causes(e: BaseException) -> list[BaseException]:
    """The exceptions inside a Ray failure, unwrapped by type (never by parsing traceback text)."""
    out, todo, seen = [], [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        inner = [getattr(x, a, None) for a in _WRAPPED] + list((getattr(x, "worker_failures", None) or {}).values())
        inner = [i for i in inner if isinstance(i, BaseException)]
        if inner:  # a wrapper (a RayTaskError may also subclass the cause's type: look inside it)
            todo += inner
        else:
            out.append(x)
            todo.append(x.__cause__)
    return out


def user_error(e: BaseException) -> PetlError | None:
    """The PetlError behind a Ray failure, if the failure was one: deterministic, never retried."""
    return next((x for x in root_causes(e) if isinstance(x, PetlError)), None)


def ray_error(e: BaseException) -> PetlError:
    """A Ray training failure as one line: the user's error if it was one, else the root cause."""
    found = user_error(e)
    if found is not None:
        return PetlError(str(found))
    x = (root_causes(e) or [e])[0]
    first = next((ln.strip() for ln in str(x).splitlines() if ln.strip()), "")
    return PetlError(f"training failed: {type(x).__name__}" + (f": {first[:300]}" if first else ""))


def run_train(spec: TrainSpec) -> dict:
    """Fine-tune through Ray Train: ``spec.workers`` data-parallel ranks, checkpoints in Ray
    storage, metrics and the adapter in MLflow. ``spec`` is validated first, before any cluster
    starts. Returns the last reported metrics + run id + checkpoint."""
    spec.validate()
    return fit_checked(spec)


def fit_checked(spec: TrainSpec) -> dict:
    """``run_train`` for a spec already validated (the VTAB suite's final fits)."""
    import time

    from ..tracking.runs import git_commit
    from .trial import ray_train_worker, trial_config

    task, method, settings, name = spec.task, spec.method, spec.settings, spec.name
    t0 = time.time()
    started = ensure_ray(spec.address, num_cpus=None)
    try:
        import ray.train
        from ray.train.torch import TorchTrainer

        name = name or f"train-{task}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, fs = storage(settings.storage_path)
        res = {"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
        config = trial_config(task, method, spec.backbone, settings, spec.experiment, spec.hparams, spec.train,
                              spec.budget, tags={"mlflow.source.git.commit": git_commit(), "petl.job": name, **spec.tags},
                              run_name=name)
        # Ray retries any worker failure; a PetlError (bad data, bad hyperparameters) fails the
        # same way every time. So Ray gets no retries, and a failure is retried here, by type: a
        # PetlError never, anything else (a dead worker or node) up to max_failures times, each
        # rerun of the same name and storage resuming from the run's latest checkpoint.
        for attempt in range(spec.max_failures + 1):
            trainer = TorchTrainer(
                ray_train_worker, train_loop_config=config,
                scaling_config=ray.train.ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                                       resources_per_worker=res),
                run_config=ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                               failure_config=ray.train.FailureConfig(max_failures=0)))
            try:
                result = trainer.fit()
                break
            except Exception as e:  # noqa: BLE001 - TrainingFailedError wraps the workers' exceptions
                if user_error(e) is not None or attempt == spec.max_failures:
                    raise ray_error(e) from None
        out = dict(result.metrics or {})
        out.update(accuracy=out.get("test_accuracy"), wall_s=round(time.time() - t0, 2), task=task, method=method,
                   workers=spec.workers, name=name,
                   checkpoint=result.checkpoint.path if result.checkpoint else None)
        return out
    finally:
        if started is not None:
            import ray
            ray.shutdown()

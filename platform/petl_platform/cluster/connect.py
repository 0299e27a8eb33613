"""The one place a Ray connection is owned: connect to a cluster (or start a local one) and shut
down only what this process started (``ray_session``), resolve Ray storage, and turn a Ray failure
into the user's one-line error (``ray_error``)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from urllib.parse import urlparse

from ..errors import PetlError
from ..tracking.settings import SECRET_ENV_VARS, forwarded_env
from ..training.spec import check_address


def in_ray_job() -> bool:
    """Whether this process runs inside a Ray job (or is pointed at a cluster by ``RAY_ADDRESS``):
    ``ensure_ray()`` then connects to that cluster instead of starting one."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


# What a warm worker imports before it takes work (``ensure_ray(warm=True)``): the modules a trial
# imports (the platform with torch and timm, MLflow, Ray Tune), about 6 s for a new worker on 2
# cores. ``PETL_WARM_WORKERS=0`` turns it off.
WARM_MODULES = ("petl_platform.cluster.tune", "mlflow", "ray.tune")


def prepare_tune_actors() -> None:
    """Call before a Tune run starts. Ray Tune gives every trial actor a ``runtime_env`` of its own
    (``ray.tune.execution.class_cache``, Ray 2.60): ``PL_DISABLE_FORK=1`` (for PyTorch Lightning,
    which the platform does not use) and the driver's ``AWS_*`` credentials and Ray Train settings.

    - Credentials never travel that way (docs/safety.md): the runtime-env agent writes them to its
      log. A trial gets them as every Ray worker does, from its node's environment (a local cluster
      inherits the shell's).
    - Without ``PL_DISABLE_FORK`` a trial's ``runtime_env`` is the job's, so the trial can start on
      an idle warm worker (``ensure_ray(warm=True)``) instead of a new process."""
    from ray.tune.execution import class_cache

    class_cache.DEFAULT_ENV_VARS = {}
    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - SECRET_ENV_VARS


def warm_workers() -> bool:
    """Whether a local cluster started with ``warm=True`` preloads ``WARM_MODULES``."""
    return os.environ.get("PETL_WARM_WORKERS", "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True,
               warm: bool = False):
    """Connect to ``address``, to the cluster of the Ray job this runs in, or start a local
    cluster. Returns the ``RayContext`` when this call initialised Ray (the caller then shuts it
    down), else None. ``log_to_driver=False`` leaves the workers' and actors' output in Ray's log
    files (``petl demo``: the terminal shows only progress and results).

    ``warm``: a local cluster started here has warm workers. Ray starts one idle worker per CPU
    with the cluster, and each imports ``WARM_MODULES`` (Ray's ``preload_python_modules``) while
    the driver sets up, so the command's first trials start on one in well under a second instead
    of importing torch, timm, MLflow and Ray Tune themselves. Ray 2.60 starts no new idle workers
    later, and one that has run a task no longer takes an actor. Each costs about 0.5 GB of its
    own memory. Off with ``PETL_WARM_WORKERS=0``; a cluster started elsewhere takes
    ``RAY_preload_python_modules`` at ``ray start``."""
    import ray

    if ray.is_initialized():
        return None
    if address:
        gcs = check_address(address)
        if gcs:  # settle token auth now, not in ray.init's retries
            from .auth import prepare_gcs
            prepare_gcs(gcs)
    in_job = in_ray_job()
    kwargs = {"log_to_driver": log_to_driver, "configure_logging": True, "logging_level": "WARNING"}
    if address and not in_job:  # inside a Ray job the job's runtime_env already carries the env vars
        # Settings only: credentials come from the cluster's environment (a Secret, .env). A
        # cluster started here inherits this process's environment and needs no runtime_env;
        # without one, its idle workers can take the job's tasks and actors.
        kwargs["runtime_env"] = {"env_vars": forwarded_env()}
    if not address and not in_job:
        # The dashboard serves the State API Ray Train's controller polls, and the Jobs API.
        kwargs.update(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
        if warm and warm_workers():
            kwargs["_system_config"] = {"preload_python_modules": list(WARM_MODULES)}
        # Ray turns token auth on for a cluster it starts and says so in a WARNING on every run,
        # nothing to act on (RAY_AUTH_MODE=disabled still opts out). Setting RAY_AUTH_MODE here
        # instead would not do: Ray caches its config, and its own client then sends no token.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        # "local": always a new cluster of our own, never one a stale /tmp/ray/ray_current_cluster names
        return ray.init(address=address or (None if in_job else "local"), **kwargs)
    except ConnectionError as e:
        raise PetlError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS')}: {e}") from None
    except ray.exceptions.AuthenticationError:
        from .auth import auth_error
        raise auth_error(address or os.environ.get("RAY_ADDRESS")) from None


def ray_logs_dir() -> str | None:
    """The Ray session's log folder on this node (each worker's and actor's ``.out``/``.err``), or
    None when there is none here (a ``ray://`` client)."""
    import ray

    try:
        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private Ray API: the hint is optional
        return None


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


def ray_error(e: BaseException, what: str = "training") -> PetlError:
    """A Ray failure of ``what`` (training, prediction) as one line: the user's error if it was
    one, else the root cause."""
    found = user_error(e)
    if found is not None:
        return PetlError(str(found))
    x = (root_causes(e) or [e])[0]
    first = next((ln.strip() for ln in str(x).splitlines() if ln.strip()), "")
    return PetlError(f"{what} failed: {type(x).__name__}" + (f": {first[:300]}" if first else ""))


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True,
                warm: bool = False):
    """``with ray_session(address): ...`` runs the body connected to Ray (``ensure_ray``) and shuts
    Ray down afterwards only if this call started or joined it; a connection made earlier in the
    process is left as it was. Yields the ``RayContext`` this call created, or None."""
    started = ensure_ray(address, num_cpus=num_cpus, log_to_driver=log_to_driver, warm=warm)
    try:
        yield started
    finally:
        if started is not None:
            import ray
            ray.shutdown()

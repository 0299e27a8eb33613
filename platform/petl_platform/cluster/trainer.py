"""A one-worker ``petl train`` on a long-lived trainer: a detached Ray actor that outlives the job
that started it, so the next ``petl train`` on the same cluster starts in its process instead of
a new one (Ray's worker start-up and the imports of torch, timm and MLflow; the backbone and the
task's tensors, too, when they are the same: ``training.trial.loaded``).

- **Naming.** Trainers are named actors in the ``petl`` namespace, ``petl-trainer-<key>-<i>``: the
  key digests what a job needs of its process (its CPUs and GPU, the platform's version, the
  job's ``runtime_env``). A job takes the first idle trainer of its key, or starts one.
  One trainer runs one job at a time; two jobs at once run on two trainers.
- **Lifetime.** A trainer holds its CPUs while it lives, and exits after ``PETL_TRAINER_IDLE_S``
  seconds without a job (default 300; 0: at the end of each job). Commands that need the
  cluster's CPUs for something else (a sweep, a multi-worker ``petl train``, ``petl predict``,
  ``petl serve`` on the cluster) end the idle trainers first (``release_idle_trainers``).
- **Failures,** as a Tune trial had them: every epoch's checkpoint goes to Ray storage
  (``STORAGE/NAME/checkpoint_NNNNNN``), and a job whose trainer is lost, or whose training raises
  anything but a ``PetlError``, runs again on another trainer from the last checkpoint, in the same
  MLflow run, up to ``max_failures`` times. A ``PetlError`` is never retried.
- **Stopping.** The trainer stops a job at its next epoch when the command is interrupted
  (``ray.cancel``) or its Ray job has ended (the driver died); the job's MLflow run is marked
  FAILED with the reason, and its checkpoints stay."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable

from ..errors import PetlError
from .connect import ray_error, user_error

NAMESPACE = "petl"
PREFIX = "petl-trainer-"
CHECKPOINT = "checkpoint_{:06d}"
MAX_TRAINERS = 64  # per key: the names a job tries before it gives up
INTERRUPTED = "the petl train command was interrupted"
CLAIM_TTL_S = 120  # a claimed trainer whose job has not started by then is free again
WATCH_S = 5.0  # how often a trainer looks at its claim and its idle time


def idle_seconds() -> float:
    """``PETL_TRAINER_IDLE_S``: how long a trainer waits for its next job (default 300 s)."""
    raw = os.environ.get("PETL_TRAINER_IDLE_S", "300")
    try:
        value = float(raw)
    except ValueError:
        raise PetlError(f"PETL_TRAINER_IDLE_S must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise PetlError(f"PETL_TRAINER_IDLE_S must be >= 0, got {raw!r}")
    return value


class Stopped(Exception):  # noqa: N818 - the reason a trainer ended a job early (the MLflow run's failure tag)
    pass


class Checkpoints:
    """A job's checkpoints in Ray storage: ``PATH/NAME/checkpoint_NNNNNN`` (NNNNNN: the epochs done)
    on ``fs`` (a ``pyarrow`` filesystem; None: the local one)."""

    def __init__(self, path: str, name: str, fs=None):
        import pyarrow.fs

        self.root = f"{path.rstrip('/')}/{name}"
        self.fs = fs or pyarrow.fs.LocalFileSystem()

    def latest(self):
        """The last checkpoint written, as a ``ray.train.Checkpoint``, or None."""
        import pyarrow.fs
        from ray.train import Checkpoint

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        found = sorted(i.base_name for i in infos
                       if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        return Checkpoint(f"{self.root}/{found[-1]}", filesystem=self.fs) if found else None

    def save(self, local_dir: str, epoch: int):
        """Uploads ``local_dir`` as the checkpoint after ``epoch`` epochs; returns it."""
        import pyarrow.fs
        from ray.train import Checkpoint

        dest = f"{self.root}/{CHECKPOINT.format(epoch)}"
        self.fs.create_dir(dest, recursive=True)
        pyarrow.fs.copy_files(local_dir, dest, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)
        return Checkpoint(dest, filesystem=self.fs)


def _job_alive(job_id: str) -> bool:
    """Whether Ray job ``job_id`` (the ``petl train`` driver) still runs. Ray's GCS job table,
    through a private client (no public call answers it without the dashboard): when it cannot be
    read, the job counts as alive."""
    import ray

    try:
        gcs = ray._private.worker.global_worker.gcs_client
        info = gcs.get_all_job_info(job_or_submission_id=job_id, skip_submission_job_info_field=True,
                                    skip_is_running_tasks_field=True)
        return not any(v.is_dead for v in info.values())
    except Exception:  # noqa: BLE001 - see above
        return True


class Trainer:
    """The actor (``ray.remote`` in ``_actor_class``). ``max_concurrency`` 2: ``claim`` and
    ``retire`` answer while a job runs."""

    def __init__(self, idle_s: float):
        self._lock = threading.Lock()  # held from claim to the end of the job, or for good by retire
        self._state = threading.Lock()  # guards _claimed between claim, fit and the watchdog
        self._claimed: float | None = None  # when a claim not yet followed by its fit was made
        self._idle_s = idle_s
        self._last = time.monotonic()
        threading.Thread(target=self._watch, name="petl-trainer-idle", daemon=True).start()

    def claim(self) -> bool:
        """Takes this trainer for one job (``fit``) if it is idle. A claim whose ``fit`` does not
        come within ``CLAIM_TTL_S`` (its command died in between) lapses."""
        if not self._lock.acquire(blocking=False):
            return False
        with self._state:
            self._claimed = time.monotonic()
        return True

    def retire(self) -> bool:
        """Takes this idle trainer out of use for good; False if busy. The caller ends it, and it
        ends itself soon after if the caller does not."""
        if not self._lock.acquire(blocking=False):
            return False
        threading.Timer(10, self._end).start()
        return True

    def pid(self) -> int:
        return os.getpid()

    def _end(self) -> None:
        import ray

        ray.kill(ray.get_runtime_context().current_actor)  # ends this process

    def _watch(self) -> None:
        while True:
            time.sleep(min(WATCH_S, max(0.05, self._idle_s / 4)))
            with self._state:
                if self._claimed is not None and time.monotonic() - self._claimed > CLAIM_TTL_S:
                    self._claimed = None
                    self._last = time.monotonic()
                    self._lock.release()
            if time.monotonic() - self._last >= self._idle_s and self._lock.acquire(blocking=False):
                self._end()  # no job runs, and none can start
                return

    def _start(self) -> None:
        with self._state:
            if self._claimed is None and not self._lock.acquire(blocking=False):  # the claim lapsed
                raise RuntimeError("this trainer's claim lapsed and another job took it")
            self._claimed = None

    def fit(self, config: dict, path: str, name: str, fs, job_id: str, cpus: float):
        """Runs one job (``training.trial.run_trial``) after ``claim``: yields each epoch's
        metrics as it is reported, then ``{"done": True, "checkpoint": PATH}``."""
        import ray
        import torch
        from ray.train import Checkpoint

        from ..training.trial import PETL_ERROR, run_trial

        self._start()
        torch.set_num_threads(max(1, int(cpus)))
        ckpts, items, stop = Checkpoints(path, name, fs), queue.Queue(), {}
        last = {}

        def report(metrics: dict, checkpoint=None) -> None:
            if stop:
                raise Stopped(stop["reason"])
            if checkpoint is not None:
                last["checkpoint"] = ckpts.save(checkpoint.path, int(metrics["epoch"]))
            items.put(("result", metrics))

        def end_job(err: PetlError, run_id: str | None) -> None:
            items.put(("result", {"val_accuracy": float("nan"), PETL_ERROR: str(err), "mlflow_run_id": run_id}))

        def run() -> None:
            try:
                run_trial(config, report=report, get_checkpoint=ckpts.latest, checkpoint_cls=Checkpoint,
                          on_user_error=end_job)
                items.put(("end", None))
            except BaseException as e:  # noqa: BLE001 - handed to the generator, which raises it
                items.put(("error", e))

        worker = threading.Thread(target=run, name="petl-trainer-job", daemon=True)
        try:
            worker.start()
            checked = time.monotonic()
            while True:
                if not stop and time.monotonic() - checked > 2:  # every 2 s, however short the epochs
                    checked = time.monotonic()
                    if ray.get_runtime_context().is_canceled():
                        stop.setdefault("reason", INTERRUPTED)
                    elif not _job_alive(job_id):
                        stop.setdefault("reason", "the petl train command that started it has ended")
                try:
                    kind, value = items.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "result":
                    yield value
                elif kind == "error":
                    if isinstance(value, Stopped):
                        return
                    raise value
                else:
                    yield {"done": True, "checkpoint": last["checkpoint"].path if last else None}
                    return
        finally:  # also when Ray closes the generator (ray.cancel): the job stops at its next epoch
            stop.setdefault("reason", INTERRUPTED)
            worker.join()
            self._last = time.monotonic()
            self._lock.release()


def _actor_class():
    import ray

    return ray.remote(max_concurrency=2)(Trainer)


def trainer_key(cpus: float, gpus: float) -> str:
    """What a job needs of its trainer's process, digested: its resources, the platform's version
    and the job's ``runtime_env`` (its variables, its ``working_dir``: a job never runs in a
    process made for another job's settings or code)."""
    import ray

    from ..version import __version__

    env = dict(ray.get_runtime_context().runtime_env or {})
    raw = json.dumps([__version__, float(cpus), float(gpus), env], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


def _trainers() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX))


def release_idle_trainers(keep: str | None = None) -> int:
    """Ends every idle trainer on the cluster (but those of key ``keep``), so what a command
    starts next gets their CPUs; returns how many ended. A busy trainer is left to its job."""
    import ray

    ended = 0
    for name in _trainers():
        if keep is not None and name.startswith(f"{PREFIX}{keep}-"):
            continue
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
            if ray.get(handle.retire.remote(), timeout=30):
                ray.kill(handle)
                ended += 1
        except Exception:  # noqa: BLE001 - gone meanwhile (idle exit), or not answering: not ours to wait on
            continue
    return ended


def _claim(cpus: float, gpus: float, idle_s: float, note: Callable[[str], None] | None = None):
    """An idle trainer of this job's key, claimed for it: an existing one, else a new one (after the
    idle trainers of other keys have ended, so it gets their CPUs). A new one waits, as a Tune
    trial would, until the cluster has its resources; ``note`` hears it when that takes a while."""
    import ray

    key = trainer_key(cpus, gpus)
    existing = set(_trainers())
    for fresh in (False, True):
        if fresh:
            release_idle_trainers(keep=key)
        for i in range(MAX_TRAINERS):
            name = f"{PREFIX}{key}-{i}"
            if (name in existing) == fresh:  # first the trainers that exist, then a new name
                continue
            handle = _actor_class().options(
                name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=cpus,
                num_gpus=gpus).remote(idle_s)
            try:
                ref = handle.claim.remote()
                if fresh and note is not None and not ray.wait([ref], timeout=10)[0]:
                    note(f"waiting for the cluster's resources for a trainer: {cpus:g} CPU"
                         + (f", {gpus:g} GPU" if gpus else "") + " (busy trainers, sweeps or Serve replicas hold them)")
                if ray.get(ref):
                    return handle
            except ray.exceptions.RayActorError:  # it exited meanwhile: try the next name
                continue
    raise PetlError(f"no idle petl trainer: {MAX_TRAINERS} jobs of this kind already run on the cluster")


def fit_on_trainer(config: dict, path: str, name: str, fs, *, cpus: float, gpus: float, max_failures: int,
                   on_result: Callable[[dict], None] | None = None,
                   on_restart: Callable[[], None] | None = None,
                   note: Callable[[str], None] | None = None) -> tuple[dict, str | None]:
    """Runs ``config`` (``training.trial.trial_config``) as job ``name`` on a trainer; returns the
    last reported metrics and the last checkpoint's path. ``on_result`` gets each epoch's metrics;
    ``on_restart`` is called before a rerun after a failure that is not the user's; ``note`` gets
    a line when a new trainer waits for the cluster's resources."""
    import ray

    idle_s = idle_seconds()
    job_id = ray.get_runtime_context().get_job_id()
    for attempt in range(max_failures + 1):
        handle = _claim(cpus, gpus, idle_s, note)
        gen = handle.fit.remote(config, path, name, fs, job_id, cpus)
        metrics: dict = {}
        try:
            for ref in gen:
                item = ray.get(ref)
                if item.get("done"):
                    return metrics, item["checkpoint"]
                metrics = item
                if on_result is not None:
                    on_result(item)
            raise RuntimeError("the trainer ended the job without a result")
        except KeyboardInterrupt:
            ray.cancel(gen)
            raise
        except Exception as e:  # noqa: BLE001 - a lost trainer, or the training's own exception
            if user_error(e) is not None or attempt == max_failures:
                raise ray_error(e) from None
            if on_restart is not None:
                on_restart()
    raise AssertionError("unreachable")

"""One fine-tune on a Ray cluster: the plain-torch trial (``training.trial.run_trial``) with
checkpoints in Ray storage, metrics and the adapter in MLflow; with ``spec.register`` the run's
adapter is registered as the challenger.

One worker runs on a long-lived trainer (``cluster.trainer``): a detached actor that the next
``petl train`` on the same cluster reuses, with torch, timm and MLflow imported and the backbone
loaded. N > 1 workers run as a Ray Train ``TorchTrainer``, N data-parallel ranks. Both restart
from the run's last checkpoint after a failure that is not the user's, up to
``spec.max_failures`` times, and both keep a ``PetlError`` from being retried."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

from ..errors import PetlError
from .connect import ray_error, ray_logs_dir, ray_session, storage, user_error

if TYPE_CHECKING:
    from ..training.spec import TrainSpec

Progress = Callable[[str], None]
ONE_WORKER_TRAINER = True  # one worker runs on a trainer; bench/trial_overhead.py measures both ways


def run_train(spec: TrainSpec, progress: Progress | None = None) -> dict:
    """Fine-tune through Ray Train: ``spec.workers`` data-parallel ranks, checkpoints in Ray
    storage, metrics and the adapter in MLflow. ``spec`` is validated first, before any cluster
    starts. Returns the last reported metrics + run id + checkpoint; with ``spec.register`` also
    ``registered``, the champion decision of the registration (``training.run.register_run``).
    ``progress``: see ``fit_checked``."""
    from ..training.run import register_run

    spec.validate()
    result = fit_checked(spec, progress)
    if spec.register:
        result["registered"] = register_run(spec.settings, spec.task, spec.method, result.get("mlflow_run_id"),
                                            result.get("val_accuracy"), model_name=spec.model_name,
                                            promote=spec.promote, tags={"job": result.get("name")})
    return result


def default_name(task: str, method: str, when: float | None = None) -> str:
    """The run's name when the spec names none: the Ray Train experiment (its checkpoint folder
    under the storage path), the MLflow run name and the ``petl.job`` tag. Built from the task's
    slug (``folder:/data/blood`` → ``folder-blood``), so no ``/`` nests folders and no local path
    leaks into the name, as sweeps and registered model names do."""
    import time

    from ..data.registry import task_slug

    return f"train-{task_slug(task)}-{method}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}"


def fit_checked(spec: TrainSpec, progress: Progress | None = None) -> dict:
    """``run_train`` for a spec already validated (the VTAB suite's final fits). ``progress``, when
    given, takes over the terminal: it gets petl's own lines (where Ray's logs are, then one line
    per epoch), and the output of the trial or of Ray Train's controller and workers (their
    per-epoch "Checkpoint successfully created" lines, tracebacks) stays in Ray's log files.
    Without it, a cluster started here forwards that output as Ray does."""
    import time

    from ..tracking.runs import git_commit
    from ..training.run import train_config
    from ..training.trial import trial_config
    from .trainer import idle_seconds

    task, method, settings, name = spec.task, spec.method, spec.settings, spec.name
    if spec.workers == 1:
        idle_seconds()  # a bad PETL_TRAINER_IDLE_S is refused before any cluster starts
    t0 = time.time()
    # Warm workers only for Ray Train's ranks: one worker's trainer is asked for at once, so on a
    # cluster this command starts it would wait for a warm worker's preload while the other warm
    # workers' preloads take the cores (measured 35.5 s per command with them, 33.6 s without)
    with ray_session(spec.address, log_to_driver=progress is None, warm=spec.workers > 1):
        name = name or default_name(task, method)
        path, fs = storage(settings.storage_path)
        config = trial_config(task, method, spec.backbone, settings, spec.experiment, spec.hparams, spec.train,
                              spec.budget, tags={"mlflow.source.git.commit": git_commit(), "petl.job": name, **spec.tags},
                              run_name=name)
        epochs = train_config(method, spec.train).epochs
        logs = ray_logs_dir()
        if progress is not None and logs:
            progress(f"Ray's logs (the workers' output and tracebacks): {logs}")
        fit = _fit_one_worker if spec.workers == 1 and ONE_WORKER_TRAINER else _fit_data_parallel
        metrics, checkpoint = fit(spec, config, name, path, fs, progress, epochs)
        out = dict(metrics)
        out.update(accuracy=out.get("test_accuracy"), wall_s=round(time.time() - t0, 2), task=task, method=method,
                   workers=spec.workers, name=name, checkpoint=checkpoint)
        return out


def _fit_one_worker(spec: TrainSpec, config: dict, name: str, path: str, fs, progress: Progress | None,
                    epochs: int):
    """One worker: a job on a long-lived trainer (``cluster.trainer``), which the next ``petl
    train`` on this cluster reuses. A failure that is not the user's reruns the job on another
    trainer from its last checkpoint, up to ``max_failures`` times; a ``PetlError`` ends it, its
    run marked FAILED, and is raised here."""
    from ..training.trial import PETL_ERROR
    from .trainer import fit_on_trainer

    def on_result(m: dict) -> None:
        if progress is not None and PETL_ERROR not in m:
            progress(epoch_line(m, epochs))

    def on_restart() -> None:
        if progress is not None:
            progress("the worker was lost: the run restarts from its last checkpoint (--max-failures)")

    error, metrics, checkpoint = None, {}, None
    try:
        metrics, checkpoint = fit_on_trainer(config, path, name, fs, cpus=spec.cpus_per_worker,
                                             gpus=1 if spec.use_gpu else 0, max_failures=spec.max_failures,
                                             on_result=on_result, on_restart=on_restart, note=progress)
    except PetlError as e:
        error = e
    if metrics.get(PETL_ERROR):
        error = PetlError(metrics[PETL_ERROR])  # the trial marked its run FAILED already
    _close_left_runs(spec, name, None if error else metrics.get("mlflow_run_id"), error)
    if error is not None:
        raise error
    return metrics, checkpoint


def _close_left_runs(spec: TrainSpec, name: str, kept: str | None, error: PetlError | None) -> None:
    """Marks FAILED every MLflow run of job ``name`` still RUNNING but ``kept``: the last one when
    the job failed (its worker died, or retries ran out), or one a restart from scratch left
    behind (a worker lost before Tune registered its first checkpoint; a restart begins a new run)."""
    from ..tracking.runs import LOST_BEFORE_CHECKPOINT, client, fail_running

    c = client(spec.settings)
    exp = c.get_experiment_by_name(spec.experiment)
    if exp is None or "'" in name:  # (a name MLflow's filter cannot quote: nothing to find by it)
        return
    fail_running(c, exp.experiment_id, f"tags.`petl.job` = '{name}'", {kept},
                 str(error) if error is not None else LOST_BEFORE_CHECKPOINT)


def _fit_data_parallel(spec: TrainSpec, config: dict, name: str, path: str, fs, progress: Progress | None,
                       epochs: int):
    """N workers: a Ray Train ``TorchTrainer`` of N data-parallel ranks (after the cluster's idle
    trainers have ended, so the ranks get their CPUs)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .trainer import release_idle_trainers

    release_idle_trainers()
    res = {"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
    with _epoch_lines(progress, epochs) as lines:
        config = {**config, PROGRESS_KEY: lines}
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
    return dict(result.metrics or {}), result.checkpoint.path if result.checkpoint else None


def epoch_line(m: dict, epochs: int) -> str:
    """petl's progress line for one epoch's reported metrics."""
    speed = f", {m['img_per_s']:.0f} img/s" if "img_per_s" in m else ""  # measured at the last epoch
    return (f"epoch {m.get('epoch')}/{epochs}: train loss {m.get('train_loss', float('nan')):.4f}, "
            f"val accuracy {m.get('val_accuracy', float('nan')):.4f}{speed}")


PROGRESS_KEY = "progress_queue"  # in the worker's config: the driver's queue of epoch metrics, or None


@contextmanager
def _epoch_lines(progress: Progress | None, epochs: int):
    """Yields a Ray queue that rank 0 puts each epoch's metrics on, and prints them on the driver
    as they come (a thread: ``fit`` blocks the main thread). The workers' own output never reaches
    this process (``log_to_driver=False``), so petl's progress cannot be a worker's print."""
    if progress is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    q = Queue(actor_options={"num_cpus": 0})  # never waits for a CPU the workers hold
    done = threading.Event()

    def pump():
        while True:
            try:
                m = q.get(timeout=0.5)
            except Empty:
                if done.is_set():  # fit returned and the queue is drained: the last epoch is printed
                    return
                continue
            except Exception:  # noqa: BLE001 - Ray going down: fit's own error is the one to report
                return
            progress(epoch_line(m, epochs))

    t = threading.Thread(target=pump, name="petl-epoch-lines", daemon=True)
    t.start()
    try:
        yield q
    finally:
        done.set()
        t.join(timeout=30)
        with suppress(Exception):  # a cluster already gone took the queue with it
            q.shutdown()


def ray_train_worker(config: dict) -> None:
    """``TorchTrainer`` ``train_loop_per_worker``: one data-parallel rank of ``run_trial``. Rank 0
    also puts each epoch's metrics on the driver's progress queue, once Ray has them."""
    import ray.train

    from ..training.trial import run_trial

    ctx = ray.train.get_context()
    lines = config.get(PROGRESS_KEY) if ctx.get_world_rank() == 0 else None

    def report(metrics: dict, checkpoint=None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)
        if lines is not None:
            lines.put(metrics)

    run_trial(config, report=report, get_checkpoint=ray.train.get_checkpoint,
              checkpoint_cls=ray.train.Checkpoint, rank=ctx.get_world_rank(), world=ctx.get_world_size())

"""Ray Train: one fine-tune as a ``TorchTrainer`` with N data-parallel workers, each running the
plain-torch trial (``training.trial.run_trial``), checkpoints in Ray storage, metrics and the
adapter in MLflow; with ``spec.register`` the run's adapter is registered as the challenger."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .connect import ray_error, ray_session, storage, user_error

if TYPE_CHECKING:
    from ..training.spec import TrainSpec


def run_train(spec: TrainSpec) -> dict:
    """Fine-tune through Ray Train: ``spec.workers`` data-parallel ranks, checkpoints in Ray
    storage, metrics and the adapter in MLflow. ``spec`` is validated first, before any cluster
    starts. Returns the last reported metrics + run id + checkpoint; with ``spec.register`` also
    ``registered``, the champion decision of the registration (``training.run.register_run``)."""
    from ..training.run import register_run

    spec.validate()
    result = fit_checked(spec)
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


def fit_checked(spec: TrainSpec) -> dict:
    """``run_train`` for a spec already validated (the VTAB suite's final fits)."""
    import time

    from ..tracking.runs import git_commit
    from ..training.trial import trial_config

    task, method, settings, name = spec.task, spec.method, spec.settings, spec.name
    t0 = time.time()
    with ray_session(spec.address):
        import ray.train
        from ray.train.torch import TorchTrainer

        name = name or default_name(task, method)
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


def ray_train_worker(config: dict) -> None:
    """``TorchTrainer`` ``train_loop_per_worker``: one data-parallel rank of ``run_trial``."""
    import ray.train

    from ..training.trial import run_trial

    ctx = ray.train.get_context()
    run_trial(config, report=ray.train.report, get_checkpoint=ray.train.get_checkpoint,
              checkpoint_cls=ray.train.Checkpoint, rank=ctx.get_world_rank(), world=ctx.get_world_size())

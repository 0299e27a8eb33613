"""One fine-tune as a Ray Train worker or a Ray Tune trial: the plain-torch loop, reporting to Ray
after every epoch with a checkpoint (trainable state + the adapter so far + the MLflow run id),
resuming from Ray's checkpoint after a failure, logging to one MLflow run throughout.

The same function serves both, with no Ray import here: ``cluster.train.ray_train_worker`` passes
``ray.train``'s report/checkpoint functions and the worker's rank; ``cluster.tune.ray_tune_trial``
passes ``ray.tune``'s and runs one worker."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from ..errors import PetlError
from ..tracking.artifacts import save_adapter
from ..tracking.runs import ADAPTER_PATH, RunLogger
from ..tracking.settings import TrackingSettings
from .loop import TrainConfig, peak_memory_mb, train
from .measure import accuracy, budget_calibration, exit_probabilities, inference_metrics
from .run import dynamic_summary, prepare_finetune

TRAIN_KEYS = frozenset(f.name for f in fields(TrainConfig))
META = "trial.json"  # in every checkpoint: {"run_id", "epoch"}
PETL_ERROR = "petl_error"  # a Tune trial's last result when a PetlError ended it (see ray_tune_trial)


_LOADED: dict = {}  # this process's last (task, backbone): see loaded()


def loaded(task: str, backbone: str):
    """``(backbone_model, task_data, tensors)`` for ``prepare_finetune``, kept for the next trial
    of the same task and backbone in this process: Tune reuses a trial's actor for the next trial
    (``reuse_actors``), which then skips loading the weights and transforming the task's images.
    The backbone is frozen and shared by every model built on it (``methods.share_frozen``), and
    the loop only reads the tensors, so a trial sees exactly what a fresh process would. One
    entry: a new task or backbone replaces it, and so does a folder or VTAB task whose files
    changed, for which ``get_task`` reads a new ``Task`` (``data.registry.task_stamp``): a ``petl
    train`` trainer (``cluster.trainer``) runs the jobs of many commands."""
    from ..backbones import create_backbone
    from ..data import get_task, task_tensors

    data = get_task(task)  # the same object while the task's files stay as they were
    key = (task, backbone)
    if _LOADED.get("key") != key or _LOADED["value"][1] is not data:
        _LOADED.clear()
        bb = create_backbone(backbone)
        _LOADED.update(key=key, value=(bb, data, task_tensors(data, bb)))
    return _LOADED["value"]


def trial_config(task: str, method: str, backbone: str, settings: TrackingSettings, experiment: str,
                 hparams: dict | None = None, train: dict | None = None, budget: float | None = None,
                 tags: dict | None = None, run_name: str | None = None) -> dict:
    return {"task": task, "method": method, "backbone": backbone, "tracking": settings.to_dict(),
            "experiment": experiment, "hparams": dict(hparams or {}), "train": dict(train or {}),
            "budget": budget, "tags": dict(tags or {}), "run_name": run_name, "search": {}}


def split_hparams(values: dict) -> tuple[dict, dict]:
    """Search-space values → (method hyperparameters, training-config overrides)."""
    method = {k: v for k, v in values.items() if k not in TRAIN_KEYS}
    return method, {k: v for k, v in values.items() if k in TRAIN_KEYS}


def run_trial(config: dict, *, report, get_checkpoint, checkpoint_cls, rank: int = 0, world: int = 1,
              on_user_error=None) -> None:
    """``on_user_error(err, mlflow_run_id)``, when given, takes a PetlError instead of re-raising it."""
    t_start = time.perf_counter()
    task, method = config["task"], config["method"]
    searched_hp, searched_train = split_hparams(config.get("search", {}))
    hparams = {**config["hparams"], **searched_hp}
    overrides = {**config["train"], **searched_train}
    settings = TrackingSettings(**config["tracking"])
    ckdir = Path(tempfile.mkdtemp(prefix="petl-trial-"))
    run_id, resumed_at = None, 0
    ckpt = get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            shutil.copytree(d, ckdir, dirs_exist_ok=True)
        meta = json.loads((ckdir / META).read_text())
        run_id, resumed_at = meta["run_id"], meta["epoch"]
    overrides.update(checkpoint_dir=str(ckdir), resume=ckpt is not None,
                     progress=rank == 0 and bool(overrides.get("progress", False)))

    logger = None
    if rank == 0:
        tags = {**config["tags"], "petl.task": task, "petl.method": method, "petl.worker_pid": os.getpid(),
                "petl.world_size": world}
        if ckpt is not None:
            tags["petl.resumed_from_epoch"] = resumed_at
        logger = RunLogger(settings, config["experiment"], run_id=run_id, run_name=config.get("run_name"), tags=tags)
    try:
        model, tensors, data, cfg = prepare_finetune(task, method, config["backbone"], hparams, overrides,
                                                     loaded=loaded)
        if logger is not None and ckpt is None:
            logger.set_tags({"petl.backbone": model.backbone_name, "petl.backbone_fingerprint": model.backbone_fingerprint})
            logger.log_params({**model.config.to_dict(), **{f"train.{k}": v for k, v in cfg.to_dict().items()
                                                            if k not in ("checkpoint_dir", "resume", "progress")},
                               "task": task, "method": method, "trainable_params": model.num_trainable(),
                               "budget": config.get("budget")})

        # where a trial's time goes (docs/sweep.md): setup once, then per epoch the loop's own
        # epoch_s, the measurements, the adapter checkpoint and the MLflow logging
        setup_s = time.perf_counter() - t_start

        def on_epoch(epoch: int, metrics: dict) -> None:
            if rank != 0:
                report(metrics)
                return
            t0 = time.perf_counter()
            final = epoch + 1 == cfg.epochs
            x_val, y_val = tensors["val"]
            probs = exit_probabilities(model, x_val)  # early exits only: one val pass for both uses below
            metrics.update(inference_metrics(model, x_val, y_val, exit_probs=probs, final=final))
            if final:
                metrics["test_accuracy"] = accuracy(model, *tensors["test"])
                metrics["trainable_params"] = model.num_trainable()
                metrics["peak_mem_mb"] = peak_memory_mb(next(model.parameters()).device)
                if config.get("budget") is not None:  # DyT's activation is already in inference_metrics
                    summary = dynamic_summary(model, tensors, config["budget"], probs)
                    metrics["budget_test_accuracy"] = summary["dynamic_test"]["accuracy"]
                    metrics["budget_flops_fraction"] = summary["dynamic_test"]["flops_fraction"]
            t1 = time.perf_counter()
            save_adapter(model, ckdir / ADAPTER_PATH, task=task, classes=data.classes,
                         extra={"metrics": {k: metrics[k] for k in ("val_accuracy", "test_accuracy") if k in metrics},
                                **budget_calibration(model, x_val, y_val, probs)})
            (ckdir / META).write_text(json.dumps({"run_id": logger.run_id, "epoch": epoch + 1}))
            t2 = time.perf_counter()
            metrics.update(measure_s=t1 - t0, save_s=t2 - t1, **({"setup_s": setup_s} if epoch == resumed_at else {}))
            logger.log_metrics(metrics, step=epoch + 1)
            if final:
                logger.log_artifacts(ckdir / ADAPTER_PATH, ADAPTER_PATH)
                logger.finish()
            report({**metrics, "log_s": time.perf_counter() - t2, "mlflow_run_id": logger.run_id},
                   checkpoint=checkpoint_cls.from_directory(str(ckdir)))

        train(model, {s: tensors[s] for s in ("train", "val")}, cfg, callbacks=[on_epoch], rank=rank, world=world)
    except Exception as e:  # SystemExit is Tune stopping the trial: not a failure
        if logger is not None:
            logger.fail(f"{type(e).__name__}: {e}")
        if isinstance(e, PetlError) and on_user_error is not None:
            on_user_error(e, logger.run_id if logger is not None else None)
            return
        raise
    finally:
        shutil.rmtree(ckdir, ignore_errors=True)

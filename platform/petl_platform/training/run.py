"""One local fine-tune end to end: validate up front, load, train, optionally save the adapter."""

from __future__ import annotations

import math
import time

import torch

from ..backbones import create_backbone
from ..errors import PetlError
from ..data import check_task_name, get_task, task_tensors
from ..methods import build_model, get_method
from ..methods.registry import spec_of
from .loop import TrainConfig, seed_everything, train
from .measure import budget_calibration, exit_probabilities
from .spec import check_budget


def train_config(method: str, overrides: dict) -> TrainConfig:
    """The method's default recipe (``MethodSpec.recipe``) under the user's overrides."""
    return TrainConfig.from_dict({**get_method(method).recipe, **overrides}, "training")


def run_finetune(*args, **kwargs) -> dict:
    """``finetune`` without the model: the JSON-able result."""
    return finetune(*args, **kwargs)[1]


def prepare_finetune(task: str, method: str, backbone: str, hparams: dict | None = None,
                     train_overrides: dict | None = None, backbone_model=None, loaded=None):
    """Check every name and hyperparameter before any data or weights are loaded, then build the
    seeded model and the task tensors. Returns ``(model, tensors, task_data, train_config)``.
    ``backbone_model``: the frozen backbone, already created; ``loaded``: a callable
    ``(task, backbone) -> (backbone_model, task_data, tensors)`` that supplies all three (e.g. a
    process's cache of them, ``training.trial``)."""
    hparams = hparams or {}
    check_task_name(task)
    spec = get_method(method)
    spec.config_cls.from_dict(hparams, method)
    cfg = train_config(method, train_overrides or {})
    if loaded is not None:
        bb, data, tensors = loaded(task, backbone)
    else:
        bb = backbone_model if backbone_model is not None else create_backbone(backbone)
        data = get_task(task)
        tensors = task_tensors(data, bb)
    seed_everything(cfg.seed)  # the method's own initialisation is part of the seeded run
    model = build_model(method, bb, len(data.classes), **hparams)
    return model, tensors, data, cfg


def dynamic_summary(model, tensors: dict, budget: float | None, val_probs=None) -> dict:
    """After training: calibrated early exits (dyn_*, when ``budget`` is given) or DyT's measured
    activation on a test batch; ``{}`` for static methods. ``val_probs``: every exit's softmax on
    val (``measure.exit_probabilities``) when the caller already has it."""
    spec = spec_of(model)
    if budget is not None:
        spec.check_budget(budget)  # a method without exits: the --budget error, not an AttributeError
        return {"calibration": spec.exits.calibrate(model, *tensors["val"], budget, probs=val_probs),
                "dynamic_test": spec.exits.evaluate_dynamic(model, *tensors["test"])}
    if spec.runtime == "token_dispatch":
        model.eval()
        with torch.no_grad():
            _, info = model.infer(tensors["test"][0][:256].to(next(model.head.parameters()).device))
        return {"dynamic_test": {k: info[k] for k in ("activation_rate", "activation_rate_per_layer", "flops_ratio")}}
    return {}


def finetune(task: str, method: str, backbone: str, hparams: dict | None = None,
             train_overrides: dict | None = None, out: str | None = None, callbacks=(),
             backbone_model=None, budget: float | None = None):
    """Fine-tune ``method`` on ``task``; for Dyn-* methods, ``budget`` (fraction of full-depth
    FLOPs) calibrates the exit thresholds on val, stores them in the adapter and reports the
    calibrated model's measured test accuracy and FLOPs. A Dyn-* adapter written to ``out`` always
    carries its val-calibrated budget curve (``budget_calibration``). Returns ``(model, result)``."""
    t0 = time.time()
    check_budget(method, budget)
    model, tensors, data, cfg = prepare_finetune(task, method, backbone, hparams, train_overrides, backbone_model)
    result = train(model, tensors, cfg, callbacks=callbacks)
    # early exits: one pass of every exit over val serves the --budget calibration and the curve
    probs = exit_probabilities(model, tensors["val"][0])  # None for a method without early exits
    extra = dynamic_summary(model, tensors, budget, probs)
    if probs is not None:
        # the model carries its curve: save_adapter (and log_and_register) write it with the adapter
        curve = budget_calibration(model, *tensors["val"], probs)
        model.budget_thresholds = {float(b): ts for b, ts in curve.get("budget_thresholds", {}).items()}
        model.budget_calibration = curve.get("budget_calibration", {})
    if out:
        from ..tracking import save_adapter
        save_adapter(model, out, task=task, classes=data.classes,
                     extra={"metrics": {"accuracy": result.accuracy, "val_accuracy": result.val_accuracy}})
    return model, {"task": task, "method": method, "backbone": model.backbone_name, "accuracy": result.accuracy,
            "val_accuracy": result.val_accuracy, "trainable_params": result.trainable_params,
            "wall_s": round(time.time() - t0, 2), "train_wall_s": round(result.wall_s, 2),
            "peak_mem_mb": round(result.peak_mem_mb, 1), "epochs": cfg.epochs, "history": result.history, **extra}


def val_split_id(task: str) -> str:
    """The identity of ``task``'s val split, tagged on every registered version (``petl.val_split``)
    so that a challenger is only compared with a champion measured on the same images: the task's
    slug, the val size and a digest of the val images and labels (a VTAB-1k task: of its
    ``val200.txt``, nothing decoded). E.g. ``digits-1k:val176:3f2a9c1e0b``. ``vtab:...?final``
    gets its own slug: its val200 lies inside its training set, so its accuracy is not comparable."""
    import hashlib

    import numpy as np

    from ..data.registry import task_slug

    check_task_name(task)
    if task.startswith("vtab:"):
        from ..data.vtab import parse_name

        root, dataset, _ = parse_name(task)
        try:
            raw = (root / dataset / "val200.txt").read_bytes()
        except OSError as e:
            raise PetlError(f"cannot read the val split of {task}: {e}") from None
        n, digest = sum(1 for line in raw.splitlines() if line.strip()), hashlib.sha256(raw).hexdigest()
    else:
        x, y = get_task(task).splits["val"]
        h = hashlib.sha256(np.ascontiguousarray(y).tobytes())
        h.update(np.ascontiguousarray(x).tobytes())
        n, digest = len(y), h.hexdigest()
    return f"{task_slug(task)}:val{n}:{digest[:10]}"


def register_run(settings, task: str, method: str, run_id: str, val_accuracy: float, *, model_name: str = "{task}",
                 alias: str = "champion", promote: bool = False, split_id: str | None = None,
                 tags: dict | None = None) -> dict:
    """Register an MLflow run's adapter as the challenger of model ``model_name`` (``{task}`` and
    ``{method}`` expand) and let ``tracking.runs.register_challenger`` decide on the champion."""
    from ..data.registry import task_slug
    from ..tracking.runs import register_challenger

    if not run_id:
        raise PetlError(f"cannot register {task}: training logged no MLflow run")
    return register_challenger(settings, run_id, model_name.format(task=task_slug(task), method=method),
                               value=float(val_accuracy if val_accuracy is not None else math.nan),
                               split_id=split_id or val_split_id(task), promote=promote, champion=alias,
                               tags={"task": task, "method": method, **(tags or {})})

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


def train_config(method: str, overrides: dict) -> TrainConfig:
    """The method's default recipe (``MethodSpec.recipe``) under the user's overrides."""
    return TrainConfig.from_dict({**get_method(method).recipe, **overrides}, "training")


def run_finetune(*args, **kwargs) -> dict:
    """``finetune`` without the model: the JSON-able result."""
    return finetune(*args, **kwargs)[1]


def prepare_finetune(task: str, method: str, backbone: str, hparams: dict | None = None,
                     train_overrides: dict | None = None, backbone_model=None):
    """Check every name and hyperparameter before any data or weights are loaded, then build the
    seeded model and the task tensors. Returns ``(model, tensors, task_data, train_config)``."""
    hparams = hparams or {}
    check_task_name(task)
    spec = get_method(method)
    spec.config_cls.from_dict(hparams, method)
    cfg = train_config(method, train_overrides or {})
    bb = backbone_model if backbone_model is not None else create_backbone(backbone)
    data = get_task(task)
    tensors = task_tensors(data, bb)
    seed_everything(cfg.seed)  # the method's own initialisation is part of the seeded run
    model = build_model(method, bb, len(data.classes), **hparams)
    return model, tensors, data, cfg


# A FLOPs budget as a fraction of full depth. Slightly above 1 is meaningful: exiting at the last
# stage also pays for the earlier exits' heads (methods/dyn_exit/calibrate.py takes up to 1.5).
BUDGET_MAX = 1.5


def check_budget(method: str, budget: float | None) -> None:
    """``--budget`` calibrates early exits: only Dyn-* methods have them, and it must be a finite
    fraction in (0, BUDGET_MAX]. Checked before any data, cluster or training."""
    if budget is None:
        return
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or not 0 < budget <= BUDGET_MAX:
        raise PetlError(f"--budget is the fraction of full-depth FLOPs the early exits may spend, "
                        f"0 < budget <= {BUDGET_MAX} (e.g. 0.5); got {budget}")
    if get_method(method).runtime != "early_exit":
        raise PetlError(f"--budget applies to early-exit methods (dyn_*), not {method!r}")


def dynamic_summary(model, tensors: dict, budget: float | None) -> dict:
    """After training: calibrated early exits (dyn_*, when ``budget`` is given) or DyT's measured
    activation on a test batch; ``{}`` for static methods."""
    if budget is not None:
        from ..methods.dyn_exit import calibrate
        from ..methods.dyn_exit.calibrate import evaluate_dynamic

        return {"calibration": calibrate(model, *tensors["val"], budget),
                "dynamic_test": evaluate_dynamic(model, *tensors["test"])}
    if spec_of(model).runtime == "token_dispatch":
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
    calibrated model's measured test accuracy and FLOPs. Returns ``(model, result)``."""
    t0 = time.time()
    check_budget(method, budget)
    model, tensors, data, cfg = prepare_finetune(task, method, backbone, hparams, train_overrides, backbone_model)
    result = train(model, tensors, cfg, callbacks=callbacks)
    extra = dynamic_summary(model, tensors, budget)
    if out:
        from ..tracking import save_adapter
        save_adapter(model, out, task=task, classes=data.classes,
                     extra={"metrics": {"accuracy": result.accuracy, "val_accuracy": result.val_accuracy}})
    return model, {"task": task, "method": method, "backbone": model.backbone_name, "accuracy": result.accuracy,
            "val_accuracy": result.val_accuracy, "trainable_params": result.trainable_params,
            "wall_s": round(time.time() - t0, 2), "train_wall_s": round(result.wall_s, 2),
            "peak_mem_mb": round(result.peak_mem_mb, 1), "epochs": cfg.epochs, "history": result.history, **extra}

"""Adapter artifacts: ``adapter.safetensors`` (adapter + head, never backbone weights) and
``adapter_config.json`` (method, hyperparameters, task, classes, backbone name + fingerprint, and for
early-exit methods the val-calibrated ``budget_thresholds`` curve, read and written through the
method's ``MethodSpec.exits``: see methods/registry.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..version import __version__
from ..errors import PetlError

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


def save_adapter(model, path, task: str | None = None, classes: list[str] | None = None,
                 extra: dict | None = None) -> Path:
    """Write ``model``'s trainable state and config to directory ``path``; returns the path.
    ``extra`` adds config keys, e.g. ``budget_curve``'s ``budget_thresholds`` (checked here). A
    model that carries its curve (``model.budget_thresholds``, set by ``finetune`` and
    ``load_adapter``) keeps it unless ``extra`` gives another."""
    from ..methods.registry import spec_of
    from .mlmodel import write_mlmodel

    path = Path(path)
    exits = spec_of(model).exits
    carried = getattr(model, "budget_thresholds", None)
    if carried and "budget_thresholds" not in (extra or {}):
        # without exits, no curve: _budget_curve refuses it below, before anything is written
        curve = carried if exits is None else {exits.budget_key(b): [float(t) for t in ts] for b, ts in carried.items()}
        extra = {"budget_thresholds": curve,
                 "budget_calibration": dict(getattr(model, "budget_calibration", None) or {}), **(extra or {})}
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    config = {
        "method": model.method, "hparams": model.config.to_dict(), "num_classes": model.num_classes,
        "task": task, "classes": classes, "backbone": model.backbone_name,
        "backbone_fingerprint": model.backbone_fingerprint, "library_version": __version__,
        "num_trainable": model.num_trainable(), **(extra or {}),
    }
    _budget_curve(model, config.get("budget_thresholds"), str(path / CONFIG))  # never write one load refuses
    tmp = path / f".{WEIGHTS}.{os.getpid()}.tmp"
    save_file(state, str(tmp), metadata={"method": model.method, "backbone_fingerprint": model.backbone_fingerprint})
    os.replace(tmp, path / WEIGHTS)
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_mlmodel(path, config)  # every adapter directory is an MLflow Model (tracking/mlmodel.py)
    return path


def read_adapter_config(path) -> dict:
    cfg_path = Path(path) / CONFIG
    if not cfg_path.exists():
        raise PetlError(f"{path} is not an adapter artifact: {CONFIG} missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PetlError(f"{cfg_path} is not valid JSON: {e}") from None
    for key in ("method", "hparams", "num_classes", "backbone_fingerprint"):
        if key not in cfg:
            raise PetlError(f"{cfg_path} lacks {key!r}")
    return cfg


def _budget_curve(model, raw, source: str) -> dict[float, list[float]]:
    """The artifact's ``budget_thresholds`` as ``{budget: thresholds}`` (``{}`` when absent), checked
    by the method's exits; an adapter of a method without calibrated exits must carry none."""
    from ..methods.registry import spec_of

    exits = spec_of(model).exits
    if exits is not None:
        return exits.parse_budget_curve(raw, model, source)
    if raw is None or raw == {}:
        return {}
    raise PetlError(f"{source}: budget_thresholds is only for early-exit methods (dyn_*), but this adapter has none; "
                    "re-save the adapter by training again, or delete the key to serve it with explicit thresholds only")


def read_adapter(path, fingerprint: str | None = None, backbone_name: str = "?") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state)`` of the adapter saved at ``path``: its ``adapter_config.json`` and the flat
    tensors of ``adapter.safetensors``, checked (a truncated or tampered file, NaN / inf values, and,
    when ``fingerprint`` is given, another backbone are refused). No module is built: a serving
    replica copies ``state`` into its adapter bank, ``model_from_state`` builds a model from it."""
    cfg = read_adapter_config(path)
    if fingerprint is not None and cfg["backbone_fingerprint"] != fingerprint:
        raise PetlError(f"adapter {path} was trained on backbone {cfg.get('backbone')!r} with fingerprint "
                        f"{cfg['backbone_fingerprint']}, but the given backbone {backbone_name!r} has fingerprint {fingerprint}")
    try:
        state = load_file(str(Path(path) / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise PetlError(f"cannot read {Path(path) / WEIGHTS} (truncated or tampered?): {e}") from None
    if any(not torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise PetlError(f"{Path(path) / WEIGHTS} holds NaN or inf values; refusing to load it")
    return cfg, state


def model_from_state(cfg: dict, state: dict[str, torch.Tensor], backbone, source: str = "state",
                     config_source: str | None = None):
    """The task model of an adapter's ``(config, state)`` (``read_adapter``) on ``backbone``, in eval mode.

    ``model.budget_thresholds`` is the artifact's ``{budget: [threshold per early exit]}`` curve
    (``{}`` for an artifact saved without one), ``model.budget_calibration`` what it was calibrated
    on; a malformed curve refuses the artifact."""
    from ..methods import build_model

    model = build_model(cfg["method"], backbone, cfg["num_classes"], **cfg["hparams"])
    model.load_trainable_state(state, source=source)
    model.task = cfg.get("task")
    model.classes = cfg.get("classes")
    model.budget_thresholds = budget_curve_of(model, cfg, config_source or source)
    calibration = cfg.get("budget_calibration")
    model.budget_calibration = calibration if isinstance(calibration, dict) and model.budget_thresholds else {}
    return model.eval()


def budget_curve_of(model, cfg: dict, source: str) -> dict[float, list[float]]:
    """The checked budget curve of an adapter config for ``model`` (a model of its method)."""
    return _budget_curve(model, cfg.get("budget_thresholds"), source)


def load_adapter(path, backbone, strict_fingerprint: bool = True):
    """Rebuild the task model saved at ``path`` on ``backbone``; refuse another backbone
    (``read_adapter`` + ``model_from_state``)."""
    cfg, state = read_adapter(path, backbone.fingerprint if strict_fingerprint else None,
                              getattr(backbone, "petl_name", "?"))
    return model_from_state(cfg, state, backbone, source=str(Path(path) / WEIGHTS), config_source=str(Path(path) / CONFIG))

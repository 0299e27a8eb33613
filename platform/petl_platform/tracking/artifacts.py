"""Adapter artifacts: ``adapter.safetensors`` (adapter + head, never backbone weights) and
``adapter_config.json`` (method, hyperparameters, task, classes, backbone name + fingerprint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import PetlError

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


def save_adapter(model, path, task: str | None = None, classes: list[str] | None = None,
                 extra: dict | None = None) -> Path:
    """Write ``model``'s trainable state and config to directory ``path``; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    config = {
        "method": model.method, "hparams": model.config.to_dict(), "num_classes": model.num_classes,
        "task": task, "classes": classes, "backbone": model.backbone_name,
        "backbone_fingerprint": model.backbone_fingerprint, "library_version": __version__,
        "num_trainable": model.num_trainable(), **(extra or {}),
    }
    tmp = path / f".{WEIGHTS}.{os.getpid()}.tmp"
    save_file(state, str(tmp), metadata={"method": model.method, "backbone_fingerprint": model.backbone_fingerprint})
    os.replace(tmp, path / WEIGHTS)
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
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


def load_adapter(path, backbone, strict_fingerprint: bool = True):
    """Rebuild the task model saved at ``path`` on ``backbone``; refuse another backbone."""
    from ..methods import build_model

    cfg = read_adapter_config(path)
    if strict_fingerprint and cfg["backbone_fingerprint"] != backbone.fingerprint:
        raise PetlError(f"adapter {path} was trained on backbone {cfg.get('backbone')!r} with fingerprint "
                        f"{cfg['backbone_fingerprint']}, but the given backbone {getattr(backbone, 'petl_name', '?')!r} "
                        f"has fingerprint {backbone.fingerprint}")
    try:
        state = load_file(str(Path(path) / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise PetlError(f"cannot read {Path(path) / WEIGHTS} (truncated or tampered?): {e}") from None
    if any(not torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise PetlError(f"{Path(path) / WEIGHTS} holds NaN or inf values; refusing to load it")
    model = build_model(cfg["method"], backbone, cfg["num_classes"], **cfg["hparams"])
    model.load_trainable_state(state, source=str(Path(path) / WEIGHTS))
    model.task = cfg.get("task")
    model.classes = cfg.get("classes")
    return model.eval()

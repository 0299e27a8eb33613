"""The plain-torch training loop (no Ray)."""

from .loop import TrainConfig, TrainResult, evaluate, resolve_device, seed_everything, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "resolve_device", "seed_everything", "train"]

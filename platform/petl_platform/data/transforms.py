"""The one preprocessing path for training, evaluation and serving (timm's data config)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config


def data_config(model) -> dict:
    """timm's data config for ``model`` at its actual input size, without a centre crop.

    The small offline images must not lose their borders (dSprites position lives there),
    so ``crop_pct`` is 1.0; mean/std/interpolation come from the model's pretrained config.
    """
    size = model.patch_embed.img_size
    return resolve_model_data_config(model, args={"input_size": (3, *size), "crop_pct": 1.0})


def make_transform(model):
    return create_transform(**data_config(model), is_training=False)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).convert("RGB")


def to_tensors(images: np.ndarray, labels: np.ndarray, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the shared transform once to a whole split (images are small and fixed)."""
    x = torch.stack([transform(to_pil(im)) for im in images]) if len(images) else torch.empty(0)
    return x, torch.as_tensor(labels, dtype=torch.long)


class LazyInputs:
    """Model inputs of a split too big to hold as float tensors (a VTAB test set): decoded and
    transformed on access, ``x[a:b]`` / ``x[index_tensor]`` → a tensor, so evaluation runs in
    chunks (``measure.accuracy``, the loop's ``evaluate``). ``lazy = True`` marks it."""

    lazy = True

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        if isinstance(idx, (int, np.integer)):
            return self.transform(to_pil(self.images[idx]))
        return to_tensors(self.images[idx], np.zeros(0), self.transform)[0]

    @property
    def shape(self) -> tuple:
        return (len(self), *self[0:1].shape[1:]) if len(self) else (0,)


def task_tensors(task, backbone) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every split of ``task`` through the backbone's transform, as ``(x, y)`` tensors (a lazy
    split, e.g. a VTAB test set, as ``LazyInputs``: transformed chunk by chunk when read)."""
    tf = make_transform(backbone)
    return {split: (LazyInputs(images, tf), torch.as_tensor(labels, dtype=torch.long))
            if getattr(images, "lazy", False) else to_tensors(images, labels, tf)
            for split, (images, labels) in task.splits.items()}

"""User data as an ImageFolder tree: ``PATH/{train,test}/<class>/*.{png,jpg}``, optional ``val/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import PetlError
from .registry import Task, carve_val

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
NATIVE = 64  # images are stored at 64x64 RGB; the shared transform resizes to the model input
SEED = 0


def _read_split(root: Path, classes: list[str] | None):
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = classes or found
    extra = set(found) - set(classes)
    if extra:
        raise PetlError(f"{root} has classes not in train/: {sorted(extra)}")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*")) if (root / cls).is_dir() else []:
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            try:
                img = Image.open(f).convert("RGB").resize((NATIVE, NATIVE), Image.Resampling.BICUBIC)
            except (UnidentifiedImageError, OSError) as e:
                raise PetlError(f"cannot read image {f}: {e}") from None
            images.append(np.asarray(img))
            labels.append(label)
    if not images:
        raise PetlError(f"no images (*.png, *.jpg) found under {root}/<class>/")
    return (np.stack(images), np.array(labels, np.int64)), classes


def load_folder_task(path: str) -> Task:
    root = Path(path)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise PetlError(f"folder task {path!r} needs {split}/<class>/ subfolders with images")
    train, classes = _read_split(root / "train", None)
    test, _ = _read_split(root / "test", classes)
    if (root / "val").is_dir():
        val, _ = _read_split(root / "val", classes)
    else:
        train, val = carve_val(train, SEED, max(1, len(train[1]) // 10))
    return Task(f"folder:{path}", classes, f"folder {root.resolve()}", SEED,
                {"train": train, "val": val, "test": test})

"""User data as an ImageFolder tree: ``PATH/{train,test}/<class>/*.{png,jpg}``, optional ``val/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import PetlError
from .task import Task, carve_val

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


def check_folder_task(path: str) -> dict[str, dict[str, int]]:
    """The up-front check of a folder task, without decoding it: train/ and test/ exist, every
    image's header opens (PIL ``verify``: cheap, no pixel decoding), train/ has at least 2 classes
    with images, test/ and val/ name only train's classes. Returns ``{split: {class: images}}``."""
    root = Path(path)
    if not root.is_dir():
        raise PetlError(f"task folder {path!r} does not exist")
    counts = {}
    for split in ("train", "test", "val"):
        if not (root / split).is_dir():
            if split == "val":
                continue
            raise PetlError(f"folder task {path!r} needs {split}/<class>/ subfolders with images")
        counts[split] = {d.name: _check_images(d) for d in sorted((root / split).iterdir()) if d.is_dir()}
    classes = [c for c, n in counts["train"].items() if n]
    if len(classes) < 2:
        raise PetlError(f"folder task {path!r} has {len(classes)} class with images under train/ ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least 2: add a train/<class>/ folder of images per class")
    for split in ("test", "val"):
        extra = sorted(set(counts.get(split, {})) - set(counts["train"]))
        if extra:
            raise PetlError(f"{root / split} has classes not in train/: {extra}")
        if split in counts and not any(counts[split].values()):
            raise PetlError(f"no images (*.png, *.jpg) found under {root / split}/<class>/")
    return counts


def _check_images(folder: Path) -> int:
    n = 0
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            with Image.open(f) as img:
                img.verify()
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's verify() raises SyntaxError for a broken PNG
            raise PetlError(f"cannot read image {f}: {e}") from None
        n += 1
    return n


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

"""VTAB-1k in the layout the PETL repos (NOAH, RepAdapter, DTL, ARC) distribute.

``ROOT/<dataset>/{train800,val200,train800val200,test}.txt``, one ``relative/path.jpg LABEL`` per
line (the path relative to ``ROOT/<dataset>/``, an integer label). Task names:

- ``vtab:ROOT/DATASET``: the search view: train = ``train800``, val = ``val200``, test = ``test``;
- ``vtab:ROOT/DATASET?final``: the final protocol: train = ``train800val200``, test = ``test``;
  val is ``val200`` again, which is *inside* the training set here (its accuracy is not held out).

Images are decoded once to RGB and resized (bicubic) to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (224, the
ViT-B/16 input, as the PETL repos' ``Resize((224, 224))``) and kept as uint8; the backbone's
transform then resizes to its own input size and normalises. train/val (at most 1,000 images,
~150 MB) are held in memory; the test split is a ``LazyImages``: its files are checked to exist
when the task loads, then decoded chunk by chunk when evaluated, so a 21k-image (sun397) or
74k-image (dSprites) test set is never materialised.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import PetlError
from .task import Task

PREFIX = "vtab:"
FINAL = "final"
IMAGE_SIZE = 224
SUITE = "vtab1k"

VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}
VTAB_DATASETS: tuple[str, ...] = tuple(d for names in VTAB_GROUPS.values() for d in names)
VTAB_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}
SPLIT_FILES = {"train800": "train800.txt", "val200": "val200.txt", "train800val200": "train800val200.txt",
               "test": "test.txt"}


def group_of(dataset: str) -> str:
    return next((g for g, names in VTAB_GROUPS.items() if dataset in names), "other")


# ----------------------------------------------------------------------------- names

def parse_name(name: str) -> tuple[Path, str, bool]:
    """``vtab:ROOT/DATASET[?final]`` → ``(ROOT, DATASET, final)``."""
    body = name[len(PREFIX):] if name.startswith(PREFIX) else name
    body, _, option = body.partition("?")
    if option not in ("", FINAL):
        raise PetlError(f"unknown VTAB option {option!r} in {name!r}: use vtab:ROOT/DATASET or vtab:ROOT/DATASET?final")
    path = Path(os.path.expanduser(body.rstrip("/")))
    if not body.strip("/") or not path.name:
        raise PetlError(f"VTAB task {name!r} needs a dataset folder: vtab:ROOT/DATASET (e.g. vtab:/data/vtab-1k/cifar)")
    return path.parent, path.name, option == FINAL


def task_name(root, dataset: str, final: bool = False) -> str:
    return f"{PREFIX}{Path(root) / dataset}" + (f"?{FINAL}" if final else "")


def slug(name: str) -> str:
    _, dataset, final = parse_name(name)
    return f"vtab-{dataset}" + ("-final" if final else "")


# ----------------------------------------------------------------------------- list files

def read_list(path: Path, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """One split file → (image paths relative to the dataset folder, int64 labels)."""
    if not path.is_file():
        raise PetlError(f"VTAB dataset {path.parent} has no {path.name} (each dataset folder needs "
                        f"{', '.join(SPLIT_FILES.values())})")
    paths, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(None, 1)
            try:
                label = int(parts[1]) if len(parts) == 2 else None
            except ValueError:
                label = None
            if label is None:
                raise PetlError(f"{path}:{lineno}: expected 'relative/path.jpg LABEL', got {line.strip()[:120]!r}")
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise PetlError(f"{path}:{lineno}: label {label} out of range 0..{(num_classes or 1) - 1} "
                                f"for {path.parent.name} ({num_classes} classes)")
            rel = PurePosixPath(parts[0])
            if rel.is_absolute() or ".." in rel.parts or "\\" in parts[0]:
                # a list file must not reach outside its dataset folder (../x.png, /etc/hostname)
                raise PetlError(f"{path}:{lineno}: image path {parts[0][:120]!r} leaves the dataset folder; "
                                "list paths relative to it, without '..' (e.g. images/0001.jpg)")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise PetlError(f"{path} lists no images")
    return paths, np.array(labels, np.int64)


def _num_classes(dataset_dir: Path, files: list[str]) -> int:
    """The VTAB class count for the 19 standard names, else 1 + the largest label in ``files``."""
    if dataset_dir.name in VTAB_CLASSES:
        return VTAB_CLASSES[dataset_dir.name]
    return 1 + max(int(read_list(dataset_dir / f)[1].max()) for f in files)


def _lists(dataset_dir: Path, keys) -> tuple[dict, int]:
    if not dataset_dir.is_dir():
        raise PetlError(f"VTAB dataset folder {dataset_dir} does not exist")
    for k in keys:  # every missing file is named before any line is parsed
        if not (dataset_dir / SPLIT_FILES[k]).is_file():
            read_list(dataset_dir / SPLIT_FILES[k])
    n = _num_classes(dataset_dir, [SPLIT_FILES[k] for k in keys])
    return {k: read_list(dataset_dir / SPLIT_FILES[k], n) for k in keys}, n


# ----------------------------------------------------------------------------- images

def decode(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    except FileNotFoundError:
        raise PetlError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PetlError(f"cannot read image {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def decode_many(paths: list[Path], size: int = IMAGE_SIZE) -> np.ndarray:
    if not paths:
        return np.zeros((0, size, size, 3), np.uint8)
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    if workers == 1:
        return np.stack([decode(p, size) for p in paths])
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding and resizing
        return np.stack(list(pool.map(lambda p: decode(p, size), paths)))


class LazyImages:
    """A split's images as a read-only uint8 array ``(n, size, size, 3)`` that decodes on access
    (``x[i]``, ``x[a:b]``, ``x[index_array]``). ``lazy = True`` tells the transform and the
    training loop to evaluate it in chunks instead of materialising it."""

    lazy = True
    dtype = np.uint8

    def __init__(self, paths: list[Path], size: int = IMAGE_SIZE):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return decode(self.paths[idx], self.size)
        if isinstance(idx, slice):
            return decode_many(self.paths[idx], self.size)
        return decode_many([self.paths[int(i)] for i in np.asarray(idx).reshape(-1)], self.size)

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} images at {self.size}px)"


# ----------------------------------------------------------------------------- tasks

def check_vtab_name(name: str) -> None:
    """Up-front check without reading images: the folder, the split files, their lines and labels."""
    root, dataset, final = parse_name(name)
    _lists(root / dataset, ("train800val200" if final else "train800", "val200", "test"))


def load_vtab_task(name: str) -> Task:
    """``vtab:ROOT/DATASET[?final]`` → a Task (train/val decoded at ``IMAGE_SIZE``, test lazy)."""
    root, dataset, final = parse_name(name)
    d = root / dataset
    train_key = "train800val200" if final else "train800"
    lists, n = _lists(d, (train_key, "val200", "test"))
    test_paths = [d / p for p in lists["test"][0]]
    missing = [p for p in test_paths if not p.is_file()]
    if missing:
        raise PetlError(f"image {missing[0]} listed in {d / SPLIT_FILES['test']} does not exist "
                        f"({len(missing)} of {len(test_paths)} test images missing)")
    splits = {"train": (decode_many([d / p for p in lists[train_key][0]]), lists[train_key][1]),
              "val": (decode_many([d / p for p in lists["val200"][0]]), lists["val200"][1]),
              "test": (LazyImages(test_paths), lists["test"][1])}
    view = "train800val200 / val200 (inside train) / test" if final else "train800 / val200 / test"
    return Task(name, [str(i) for i in range(n)], f"VTAB-1k {group_of(dataset)}: {d} ({view}; {IMAGE_SIZE}px)", 0,
                splits)


def discover(root) -> list[dict]:
    """The VTAB-1k datasets under ``root`` (standard order, then any other folder in the layout):
    name, group, task name, classes and the size of each split file. Reads only the lists."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise PetlError(f"VTAB root {root} does not exist")
    dirs = [p for p in root.iterdir() if p.is_dir() and any((p / f).is_file() for f in SPLIT_FILES.values())]
    order = {n: i for i, n in enumerate(VTAB_DATASETS)}
    dirs.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    if not dirs:
        raise PetlError(f"no VTAB-1k datasets under {root}: expected ROOT/<dataset>/{{train800,val200,"
                        f"train800val200,test}}.txt, e.g. {root / 'cifar' / 'train800.txt'}")
    out = []
    for d in dirs:
        lists, n = _lists(d, tuple(SPLIT_FILES))
        out.append({"name": d.name, "group": group_of(d.name), "task": task_name(root, d.name), "num_classes": n,
                    "sizes": {k: len(v[1]) for k, v in lists.items()}, "path": str(d)})
    return out


# ----------------------------------------------------------------------------- averages

def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def suite_average(results: dict[str, float]) -> dict:
    """Both VTAB-1k averaging conventions over ``{dataset: accuracy}``: ``mean_of_datasets``
    (the mean of the 19; of those present when some are missing) and ``mean_of_group_means``
    (the mean of the natural / specialized / structured means, over the groups present).
    Non-VTAB names and NaN/None values are left out and listed."""
    ok = {d: float(v) for d, v in results.items() if v is not None and math.isfinite(float(v))}
    present = {d: ok[d] for d in VTAB_DATASETS if d in ok}
    groups = {g: _mean(present[d] for d in names if d in present)
              for g, names in VTAB_GROUPS.items() if any(d in present for d in names)}
    missing = [d for d in VTAB_DATASETS if d not in present]
    return {"mean_of_datasets": _mean(present.values()), "mean_of_group_means": _mean(groups.values()),
            "group_means": groups, "datasets": len(present), "missing": missing, "complete": not missing,
            "missing_groups": [g for g in VTAB_GROUPS if g not in groups],
            "ignored": sorted(d for d in results if d not in VTAB_DATASETS)}


def select_datasets(found: list[dict], datasets: list[str] | None) -> list[dict]:
    """The discovered datasets to run: the standard ones present, or exactly ``datasets``."""
    by_name = {d["name"]: d for d in found}
    if not datasets:
        chosen = [d for d in found if d["name"] in VTAB_DATASETS]
        if not chosen:
            raise PetlError(f"none of the 19 VTAB-1k datasets is under the root (found {', '.join(by_name)}); "
                            "name the ones to run with --datasets")
        return chosen
    missing = [n for n in datasets if n not in by_name]
    if missing:
        raise PetlError(f"--datasets {', '.join(missing)} not found under the VTAB root; present: {', '.join(by_name)}")
    return [by_name[n] for n in dict.fromkeys(datasets)]

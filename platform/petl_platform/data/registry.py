"""The offline task registry: fixed splits, seeds, class names, a VTAB-1k style variant of each.

``get_task("fashion_mnist")`` gives the full task; ``get_task("fashion_mnist-1k")`` its VTAB-1k
style variant (800 train + 200 val drawn with the task's seed, test capped at 2,000 images so a
CPU evaluates it in seconds). ``get_task("folder:PATH")`` reads a user's ImageFolder tree,
``get_task("vtab:ROOT/DATASET[?final]")`` one dataset of a real VTAB-1k tree (see ``vtab.py``).
Built tasks are cached as ``.npz`` under ``$PETL_CACHE`` (default ``~/.cache/petl_platform``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import PetlError, unknown
from . import sources, synthetic
from .task import SPLITS, Task, carve_val, split_by_group, split_random  # noqa: F401 (re-exported)

VTAB1K_SUFFIX = "-1k"
CACHE_VERSION = 1


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    seed: int
    build: Callable[[int], tuple[dict, list[str]]]  # seed -> ({split: (images, labels)}, classes)


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"task {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def list_tasks(include_variants: bool = True) -> list[str]:
    names = sorted(_REGISTRY)
    return names + [n + VTAB1K_SUFFIX for n in names] if include_variants else names


# ----------------------------------------------------------------------------- built-in tasks

def _fashion(seed):
    parts, classes = sources.fashion_mnist()
    train, val = carve_val(parts["train"], seed, 5000)
    return {"train": train, "val": val, "test": parts["test"]}, classes


def _clipart(seed):
    images, labels, classes = sources.openclipart(seed=seed)
    return split_random(images, labels, seed), classes


def _letters(seed):
    images, labels, classes, fonts = sources.letters(seed=seed)
    return split_by_group(images, labels, fonts, seed), classes


def _digits(seed):
    images, labels, classes = sources.sklearn_digits()
    return split_random(images, labels, seed, (0.6, 0.1, 0.3)), classes


def _generated(fn, classes, sizes=(8000, 1000, 2000)):
    def build(seed):
        # Each split has its own seed, so no generated image appears in two splits.
        return {s: fn(n, seed * 10 + i) for i, (s, n) in enumerate(zip(SPLITS, sizes))}, classes
    return build


for _spec in [
    TaskSpec("fashion_mnist", "debian:dataset-fashion-mnist (MIT)", 0, _fashion),
    TaskSpec("clipart", "debian:openclipart-png (public domain), 8 top-level categories", 0, _clipart),
    TaskSpec("letters", "debian fonts (DejaVu, Liberation, FreeFont, URW base35), split by font", 0, _letters),
    TaskSpec("digits", "scikit-learn load_digits", 0, _digits),
    TaskSpec("dsprites_loc", "generator: dSprites-like x-position, 8 bins", 0,
             _generated(synthetic.dsprites_location, [f"x{i}" for i in range(8)])),
    TaskSpec("dsprites_ori", "generator: dSprites-like orientation, 8 bins", 0,
             _generated(synthetic.dsprites_orientation, [f"ori{i}" for i in range(8)])),
    TaskSpec("norb_azimuth", "generator: SmallNORB-like azimuth, 9 bins", 0,
             _generated(synthetic.norb_azimuth, [f"az{i}" for i in range(9)])),
    TaskSpec("clevr_count", "generator: CLEVR-like object count 3-10", 0,
             _generated(synthetic.clevr_count, [str(i) for i in range(3, 11)])),
]:
    register_task(_spec)


# ----------------------------------------------------------------------------- loading + cache

def cache_dir() -> Path:
    return Path(os.environ.get("PETL_CACHE", Path.home() / ".cache" / "petl_platform"))


def _build_cached(spec: TaskSpec):
    path = cache_dir() / "tasks" / f"{spec.name}-s{spec.seed}-v{CACHE_VERSION}.npz"
    if path.exists():
        with np.load(path) as z:
            splits = {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in SPLITS}
            return splits, [str(c) for c in z["classes"]]
    splits, classes = spec.build(spec.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    arrays = {f"{s}_{k}": v for s in SPLITS for k, v in zip("xy", splits[s])}
    np.savez(tmp, classes=np.array(classes), **arrays)
    os.replace(tmp, path)  # atomic: concurrent builders never see a half-written cache
    return splits, classes


def vtab1k(task: Task, n_train=800, n_val=200, max_test=2000) -> Task:
    rng = np.random.default_rng(task.seed + 1)

    def pick(split, n):
        images, labels = task.splits[split]
        idx = np.sort(rng.permutation(len(labels))[:n])
        return images[idx], labels[idx]

    splits = {"train": pick("train", n_train), "val": pick("val", n_val), "test": pick("test", max_test)}
    return Task(task.name + VTAB1K_SUFFIX, task.classes, task.source + "; VTAB-1k style 800/200",
                task.seed, splits)


def _base_name(name: str) -> str:
    return name[: -len(VTAB1K_SUFFIX)] if name.endswith(VTAB1K_SUFFIX) else name


def get_task(name: str) -> Task:
    """Load a task by registry name, ``<name>-1k`` variant, ``folder:PATH`` or ``vtab:ROOT/DATASET``.
    Kept in this process while its files on disk stay as they were (``task_stamp``)."""
    if name.startswith("vtab:"):
        return _get_vtab(name, task_stamp(name))
    return _get_task(name, task_stamp(name))


def task_stamp(name: str) -> str:
    """The state of a task's files on disk: a digest of each file's path, size and modification
    time under a ``folder:`` or ``vtab:`` task's folder, so a long-lived process (a ``petl train``
    trainer, ``cluster.trainer``) reads the task again once its files change; ``""`` for the
    built-in tasks, which are generated from fixed sources."""
    import hashlib

    if name.startswith("vtab:"):
        from .vtab import parse_name

        root, dataset, _ = parse_name(name)
        top = root / dataset
    elif name.startswith("folder:"):
        top = Path(name[len("folder:"):])
    else:
        return ""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            with contextlib.suppress(OSError):  # gone while we walk: its absence is the stamp
                st = os.stat(full)
                h.update(f"{os.path.relpath(full, top)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=2)  # VTAB tasks hold up to ~300 MB of 224-px images each: keep few
def _get_vtab(name: str, stamp: str) -> Task:
    from .vtab import load_vtab_task
    return load_vtab_task(name)


@functools.lru_cache(maxsize=16)
def _get_task(name: str, stamp: str) -> Task:
    if name.startswith("folder:"):
        from .folder import load_folder_task
        return load_folder_task(name[len("folder:"):])
    base = _base_name(name)
    if base not in _REGISTRY:
        raise unknown("task", name, list_tasks() + ["folder:PATH", "vtab:ROOT/DATASET"])
    spec = _REGISTRY[base]
    splits, classes = _build_cached(spec)
    task = Task(spec.name, classes, spec.source, spec.seed, splits)
    return vtab1k(task) if base != name else task


def check_task_name(name: str) -> None:
    """Validate a task name without loading it (for up-front CLI checks)."""
    if name.startswith("vtab:"):
        from .vtab import check_vtab_name
        return check_vtab_name(name)
    if name.startswith("folder:"):
        if not Path(name[len("folder:"):]).is_dir():
            raise PetlError(f"task folder {name[len('folder:'):]!r} does not exist")
        return
    base = _base_name(name)
    if base not in _REGISTRY:
        raise unknown("task", name, list_tasks() + ["folder:PATH", "vtab:ROOT/DATASET"])


def task_slug(name: str) -> str:
    """A task name safe for experiment, directory and registered-model names (no ``/`` or ``:``):
    registry names unchanged, ``vtab:ROOT/cifar`` → ``vtab-cifar``, ``folder:/a/b`` → ``folder-b``."""
    import re

    if name.startswith("vtab:"):
        from .vtab import slug
        name = slug(name)
    elif name.startswith("folder:"):
        name = "folder-" + Path(name[len("folder:"):].rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)

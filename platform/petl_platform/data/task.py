"""A task's data (``Task``: class names and fixed train/val/test splits) and the seeded split
helpers every source uses: the leaf of ``data/`` that the registry, folder and VTAB loaders share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    name: str
    classes: list[str]
    source: str
    seed: int
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)

    def sizes(self) -> dict[str, int]:
        return {s: int(len(self.splits[s][1])) for s in SPLITS}

    def info(self) -> dict:
        return {"name": self.name, "classes": self.classes, "num_classes": len(self.classes),
                "sizes": self.sizes(), "source": self.source, "seed": self.seed}


def _take(images, labels, idx):
    return images[idx], labels[idx]


def split_random(images, labels, seed, fractions=(0.7, 0.1, 0.2)) -> dict:
    """A seeded stratified split into train/val/test by the given fractions."""
    rng = np.random.default_rng(seed)
    parts = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = int(len(idx) * fractions[0]), int(len(idx) * fractions[1])
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {s: _take(images, labels, np.sort(np.concatenate(parts[s]))) for s in SPLITS}


def split_by_group(images, labels, groups, seed, fractions=(0.7, 0.1, 0.2)) -> dict:
    """Split so that each group (e.g. a font) lands in exactly one split."""
    uniq = np.random.default_rng(seed).permutation(np.unique(groups))
    n_train, n_val = int(round(len(uniq) * fractions[0])), int(round(len(uniq) * fractions[1]))
    members = {"train": uniq[:n_train], "val": uniq[n_train:n_train + n_val], "test": uniq[n_train + n_val:]}
    return {s: _take(images, labels, np.flatnonzero(np.isin(groups, g))) for s, g in members.items()}


def carve_val(train, seed, n_val):
    images, labels = train
    idx = np.random.default_rng(seed).permutation(len(labels))
    return _take(images, labels, np.sort(idx[n_val:])), _take(images, labels, np.sort(idx[:n_val]))

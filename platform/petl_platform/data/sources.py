"""Offline image sources: Debian data packages, Debian fonts and scikit-learn.

Every loader returns ``(images, labels, classes, group)``: ``uint8`` images at native resolution,
``int64`` labels, class names, and an optional per-image group id (the font, for letters) that the
registry uses to split without leakage.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import PetlError

FASHION_DIR = Path(os.environ.get("PETL_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLIPART_DIR = Path(os.environ.get("PETL_OPENCLIPART_DIR", "/usr/share/openclipart/png"))
FONT_DIRS = [Path(p) for p in os.environ.get("PETL_FONT_DIRS", "/usr/share/fonts").split(":")]

FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CLIPART_CLASSES = ["animals", "computer", "food", "people", "recreation",
                   "shapes", "signs_and_symbols", "transportation"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
# Fonts without Latin letters (symbol and dingbat faces) would render boxes, not letters.
_NON_LETTER_FONTS = ("symbol", "d050000l", "dingbat", "math")


def _need(path: Path, package: str) -> None:
    if not path.exists():
        raise PetlError(f"{path} not found: install the Debian package {package!r} (make demo/test does this)")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist():
    """Fashion-MNIST (MIT) from Debian ``dataset-fashion-mnist``: its own 60k/10k split is kept."""
    _need(FASHION_DIR, "dataset-fashion-mnist")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        parts[split] = (images, labels)
    return parts, FASHION_CLASSES


_MAX_CLIPART_PIXELS = 4_000_000  # the package holds a few poster-sized PNGs; skip them


def _load_clipart(path: Path, size: int) -> np.ndarray | None:
    img = Image.open(path)  # lazy: reads the header only
    if img.width * img.height > _MAX_CLIPART_PIXELS:
        return None
    img.load()
    img = img.convert("RGBA")
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas.convert("RGB"))


def openclipart(per_class: int = 400, size: int = 64, seed: int = 0):
    """Top-level categories of Debian ``openclipart-png`` (public domain), composited on white."""
    _need(CLIPART_DIR, "openclipart-png")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, cls in enumerate(CLIPART_CLASSES):
        files = sorted((CLIPART_DIR / cls).rglob("*.png"))
        kept = 0
        for i in rng.permutation(len(files)):
            try:
                img = _load_clipart(files[i], size)
            except (OSError, ValueError, Image.DecompressionBombError):  # a few files are not decodable
                img = None
            if img is not None:
                images.append(img)
                labels.append(label)
                kept += 1
            if kept == per_class:
                break
    return np.stack(images), np.array(labels, np.int64), CLIPART_CLASSES


def font_files() -> list[Path]:
    """Latin text fonts (TrueType/OpenType) found under the Debian font directories, sorted."""
    files = sorted({p for d in FONT_DIRS if d.exists() for ext in ("*.ttf", "*.otf") for p in d.rglob(ext)})
    return [p for p in files if not any(k in p.name.lower() for k in _NON_LETTER_FONTS)]


def letters(variants: int = 6, size: int = 64, seed: int = 0):
    """Letters A-Z rendered from every font with small random affine jitter.

    Returns a per-image font id so that train/val/test can be split *by font*.
    """
    fonts = font_files()
    if len(fonts) < 6:
        raise PetlError("fewer than 6 fonts found: install fonts-dejavu-core fonts-liberation "
                        "fonts-freefont-ttf fonts-urw-base35 (make demo/test does this)")
    rng = np.random.default_rng(seed)
    images, labels, groups = [], [], []
    for gid, path in enumerate(fonts):
        font = ImageFont.truetype(str(path), int(size * 0.6))
        for label, ch in enumerate(LETTERS):
            for _ in range(variants):
                img = Image.new("L", (size, size), 0)
                x0, y0, x1, y1 = ImageDraw.Draw(img).textbbox((0, 0), ch, font=font)
                dx, dy = rng.uniform(-0.12, 0.12, 2) * size
                pos = ((size - (x1 - x0)) / 2 - x0 + dx, (size - (y1 - y0)) / 2 - y0 + dy)
                ImageDraw.Draw(img).text(pos, ch, fill=255, font=font)
                img = img.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
                images.append(np.asarray(img))
                labels.append(label)
                groups.append(gid)
    return np.stack(images), np.array(labels, np.int64), LETTERS, np.array(groups)


def sklearn_digits():
    """scikit-learn's 8x8 handwritten digits (1,797 images), scaled to 0-255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64), [str(i) for i in range(10)]

"""Request validation for the HTTP API: every bad input becomes a ``ServeError`` with the HTTP
status and a message a client can act on, never a 500, a traceback or a Python object address.

Image decoding (``decode_image``, ``decode_pixels``) goes through ``imaging.open_rgb``, hardened against
hostile files (the formats it opens, the pixel limit read from the header, EXIF orientation,
16-bit and transparent images): see ``imaging``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ServeError
from ..imaging import FORMATS, MAX_PIXELS, image_size, open_rgb, safe_text

MAX_TASKS = 64  # tasks in one request
MAX_IMAGES = 64  # images in one request (413 above)
MAX_REQUEST_PIXELS = 64 * 2**20  # decoded pixels of all of a request's images together (413 above)
MAX_TASK_NAME = 200  # characters
MAX_THRESHOLDS = 64
MAX_TOP_K = 1000
# FORMATS, MAX_PIXELS, ServeError, image_size, open_rgb and safe_text are imported from ``imaging``
# (and ``errors``) and stay importable from here.


def decode_image(data: bytes, transform, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Image bytes → the model input through the training transform; 400/413 on anything else."""
    return transform(open_rgb(data, max_pixels))


def decode_pixels(data: bytes, pixels, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Image bytes → ``uint8 [3, H, W]`` at the model's size (``pixels``: ``data.Pixels``, the
    transform's geometric part); normalized later, where the model runs. 400/413 as ``open_rgb``."""
    return pixels.to_uint8(open_rgb(data, max_pixels))


def decode_many(images: list[bytes], pixels, max_pixels: int = MAX_PIXELS,
                max_total: int | None = None) -> torch.Tensor:
    """Many images → ``uint8 [N, 3, H, W]``. Every header is read first: a request whose images
    together exceed ``max_total`` pixels is refused (413) before any pixel is decoded."""
    if max_total is not None:
        sizes = [image_size(d) for d in images]
        total = sum(w * h for w, h in sizes)
        if total > max_total:
            raise ServeError(413, f"the request's {len(images)} images hold {total} pixels; the limit per request is "
                                  f"{max_total} pixels: send fewer or smaller images")
    out = []
    for i, d in enumerate(images):
        try:
            out.append(decode_pixels(d, pixels, max_pixels))
        except ServeError as e:
            raise ServeError(e.status, f"image {i}: {e}" if len(images) > 1 else str(e)) from None
    return torch.stack(out)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _fraction(name: str, value) -> float:
    if not _is_number(value):
        raise ServeError(400, f"{name} must be a number in (0, 1], got {safe_text(repr(value), 60)}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ServeError(400, f"{name} must be a number in (0, 1], got {safe_text(repr(value), 60)}") from None
    if not math.isfinite(v) or not 0.0 < v <= 1.0:
        raise ServeError(400, f"{name} must be in (0, 1], got {safe_text(repr(value), 60)}")
    return v


def _top_k(value) -> int:
    bad = ServeError(400, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {safe_text(repr(value), 60)}")
    if not _is_number(value):
        raise bad
    try:
        k = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise bad from None
    if isinstance(k, float):
        if not math.isfinite(k) or k != int(k):
            raise bad
        k = int(k)
    if not 1 <= k <= MAX_TOP_K:
        raise bad
    return k


def parse_knobs(body: dict) -> dict:
    """The optional per-request compute knobs: ``budget`` (fraction of full-depth FLOPs),
    ``threshold`` (one exit confidence for every exit, or a list: JSON list or comma string),
    ``ratio`` (DyT tokens), ``top_k`` (1..1000, default 3). Booleans, NaN/inf and values out of
    range are 400s."""
    knobs = {}
    if body.get("budget") is not None:
        knobs["budget"] = _fraction("budget", body["budget"])
    if body.get("threshold") is not None:
        t = body["threshold"]
        ts = t.split(",") if isinstance(t, str) else t if isinstance(t, list) else [t]
        if not ts or len(ts) > MAX_THRESHOLDS:
            raise ServeError(400, f"threshold must be a number or a list of 1 to {MAX_THRESHOLDS} numbers")
        knobs["threshold"] = [_fraction("threshold", v) for v in ts]
    if body.get("ratio") is not None:
        knobs["ratio"] = _fraction("ratio", body["ratio"])
    if "budget" in knobs and "threshold" in knobs:
        raise ServeError(400, "give budget or threshold, not both")
    knobs["top_k"] = 3 if body.get("top_k") is None else _top_k(body["top_k"])
    return knobs


def parse_tasks(value, limit: int | None = MAX_TASKS) -> list[str]:
    """A non-empty list of at most ``limit`` distinct task names (duplicates dropped, order kept);
    ``limit=None`` for a deployment's own task list, which may be long."""
    if isinstance(value, str):
        value = [t for t in value.replace(" ", "").split(",") if t]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise ServeError(400, "tasks must be a non-empty list of task names (or a comma-separated string)")
    tasks = list(dict.fromkeys(t.strip() for t in value))
    if limit is not None and len(tasks) > limit:
        raise ServeError(400, f"{len(tasks)} tasks requested; at most {limit} per request")
    long = [t for t in tasks if len(t) > MAX_TASK_NAME]
    if long:
        raise ServeError(400, f"task names are at most {MAX_TASK_NAME} characters; got one of {len(long[0])}")
    return tasks


def answer(logits: torch.Tensor, classes: list[str], top_k: int, probabilities: bool = False, **extra) -> dict:
    """One task's answer for one image: label, top-k class probabilities, plus ``extra``;
    ``probabilities``: also every class's probability, as a float32 numpy array (the OIP output)."""
    probs = logits.float().softmax(-1)
    k = min(top_k, probs.numel())
    p, i = probs.topk(k)
    out = {"label": classes[int(i[0])], "top_k": [{"class": classes[int(j)], "probability": round(float(q), 6)}
                                                 for q, j in zip(p, i)], **extra}
    if probabilities:
        out["probabilities"] = probs.cpu().numpy().astype(np.float32)
    return out

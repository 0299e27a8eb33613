"""Request validation for the HTTP API: every bad input becomes a ``ServeError`` with the HTTP
status and a message a client can act on."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import PetlError

MAX_PIXELS = 40_000_000  # decompression-bomb guard, well above any real photo


class ServeError(PetlError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, transform) -> torch.Tensor:
    """Image bytes → the model input through the training transform; 400 on anything else."""
    if not data:
        raise ServeError(400, "empty image: send the image bytes (multipart field 'image' or base64 'image' in JSON)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ServeError(400, f"image of {im.width}x{im.height} pixels is too large")
            im.load()  # truncated files fail here, not later
            rgb = im.convert("RGB")
    except ServeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ServeError(400, f"not a readable image (truncated or not PNG/JPEG/...): {str(e)[:160]}") from None
    return transform(rgb)


def _fraction(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ServeError(400, f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or not 0.0 < v <= 1.0:
        raise ServeError(400, f"{name} must be in (0, 1], got {value!r}")
    return v


def parse_knobs(body: dict) -> dict:
    """The optional per-request compute knobs: ``budget`` (fraction of full-depth FLOPs),
    ``threshold`` (one exit confidence for every exit, or a list), ``ratio`` (DyT tokens), ``top_k``."""
    knobs = {}
    if body.get("budget") is not None:
        knobs["budget"] = _fraction("budget", body["budget"])
    if body.get("threshold") is not None:
        t = body["threshold"]
        ts = t if isinstance(t, list) else [t]
        knobs["threshold"] = [_fraction("threshold", v) for v in ts]
    if body.get("ratio") is not None:
        knobs["ratio"] = _fraction("ratio", body["ratio"])
    if "budget" in knobs and "threshold" in knobs:
        raise ServeError(400, "give budget or threshold, not both")
    try:
        knobs["top_k"] = int(body.get("top_k", 3))
    except (TypeError, ValueError):
        raise ServeError(400, f"top_k must be an integer, got {body.get('top_k')!r}") from None
    if not 1 <= knobs["top_k"] <= 1000:
        raise ServeError(400, "top_k must be between 1 and 1000")
    return knobs


def parse_tasks(value) -> list[str]:
    if isinstance(value, str):
        value = [t for t in value.replace(" ", "").split(",") if t]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ServeError(400, "tasks must be a non-empty list of task names (or a comma-separated string)")
    return list(dict.fromkeys(value))


def answer(logits: torch.Tensor, classes: list[str], top_k: int, **extra) -> dict:
    """One task's answer for one image: label, top-k class probabilities, plus ``extra``."""
    probs = logits.float().softmax(-1)
    k = min(top_k, probs.numel())
    p, i = probs.topk(k)
    return {"label": classes[int(i[0])], "top_k": [{"class": classes[int(j)], "probability": round(float(q), 6)}
                                                  for q, j in zip(p, i)], **extra}

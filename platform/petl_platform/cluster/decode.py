"""``petl predict``'s decode stage, as light as a Ray Data task can be: Pillow and NumPy, no torch
(``imaging``), so a decode task's worker starts in a fraction of a second instead of importing
torch, torchvision and timm beside the scoring actors, which need the CPUs for just that."""

from __future__ import annotations

import numpy as np

from ..errors import PetlError
from ..imaging import open_rgb


def decode_batch(batch: dict, geometry) -> dict:
    """``{"path", "bytes"}`` -> ``{"path", "pixels", "error"}``, ``pixels`` ``uint8 [B, 3, H, W]``
    at the model's size (``geometry``: ``imaging.Geometry``, or ``data.Pixels`` where the model's
    transform has an op the light path does not model; normalized later, by the engine on its own
    device). Each file is decoded on its own with the HTTP API's hardened decoder
    (``imaging.open_rgb``): a file that does not decode gets the reason in ``error`` and zeros."""
    paths = [str(p) for p in batch["path"]]
    h, w = geometry.image_size
    out = np.zeros((len(paths), 3, h, w), dtype=np.uint8)
    errors: list[str | None] = [None] * len(paths)
    for i, data in enumerate(batch["bytes"]):
        try:
            out[i] = np.asarray(geometry.to_uint8(open_rgb(bytes(data))))
        except PetlError as e:
            errors[i] = str(e)
    return {"path": np.asarray(paths, dtype=object), "pixels": out, "error": np.asarray(errors, dtype=object)}

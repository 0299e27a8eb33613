"""Image bytes to model-sized ``uint8`` pixels with Pillow and NumPy alone: no torch, so a process
that only decodes (``petl predict``'s Ray Data decode tasks) starts in a fraction of a second
instead of importing torch, torchvision and timm.

- ``open_rgb``: the hardened decoder of the HTTP API and of ``petl predict``:

  - only PNG, JPEG (MPO included), WebP, GIF, BMP and TIFF are opened;
  - the pixel count is read from the header and checked against ``max_pixels`` (default
    ``MAX_PIXELS`` = 4096 x 4096, about 16.8 MP: every camera photo up to 12 MP and any image a
    client should send to a 224-px model) *before* the pixels are decoded: 413 above it. Pillow's
    own decompression-bomb guard (89 MP warning, 179 MP error) is far higher and turned into a 413;
  - EXIF orientation is applied (``ImageOps.exif_transpose``), as every image viewer does;
  - 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) is scaled to 8 bits over the 16-bit
    range (v / 257), not clipped at 255; float images (``F``) are refused: their range is unknown;
  - transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent colour) is composited onto
    white; palette, CMYK, YCbCr, 1-bit and the other modes are converted to RGB.

- ``Geometry``: the geometric part of a torchvision eval transform (``Resize``, ``CenterCrop``: what
  timm's eval transforms hold) as plain data, applied with Pillow exactly as torchvision applies it
  to a PIL image. ``data.Pixels`` builds it from the model's transform (``Pixels.light``), and its
  tests hold the two equal pixel for pixel.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ServeError

log = logging.getLogger(__name__)

MAX_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (multi-picture phone JPEGs)
_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|\bat 0x[0-9a-fA-F]+")


def safe_text(text: str, limit: int = 160) -> str:
    """``text`` fit for a response body: one line, no object addresses, at most ``limit`` chars."""
    line = _ADDRESS.sub("<data>", str(text)).replace("\n", " ").strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the image header, nothing decoded; 400 when it is no image."""
    if not data:
        raise ServeError(400, "empty image: send the image bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            return im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServeError(413, "image exceeds the decoder's pixel limit (decompression bomb): resize it before "
                              "sending") from None
    except Exception:  # noqa: BLE001 - any failure to read a header is the client's bytes
        raise ServeError(400, f"not a readable image: send {', '.join(FORMATS)} bytes") from None


def open_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image bytes → an RGB PIL image (see the module docstring); 400/413 on anything else."""
    if not data:
        raise ServeError(400, "empty image: send the image bytes (multipart field 'image' or base64 'image' in JSON)")
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that: capping the budget there makes its
    # warning a 413 too, without touching the process-wide (and thread-unsafe) warning filters
    max_pixels = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            w, h = im.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ServeError(413, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                                      "pixels: resize it before sending")
            im.load()  # truncated files fail here, not later
            return _to_rgb(ImageOps.exif_transpose(im))
    except ServeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServeError(413, f"image exceeds the limit of {max_pixels} pixels (decompression bomb): "
                              "resize it before sending") from None
    except UnidentifiedImageError:
        raise ServeError(400, f"not a readable image: send {', '.join(FORMATS)} bytes") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ServeError(400, f"not a readable image (truncated or corrupt): {safe_text(e)}") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on hostile bytes
        log.warning("image decode failed with %s: %s", type(e).__name__, safe_text(e))
        raise ServeError(400, f"not a readable image (corrupt {type(e).__name__})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit samples: 0..65535 → 0..255 (v / 257), the whole range kept rather than clipped
        a = np.asarray(im.convert("I") if im.mode != "I" else im, dtype=np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) // 257).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise ServeError(400, "32-bit float images are not supported: send 8- or 16-bit PNG/JPEG/...")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Resize:
    """torchvision's ``Resize`` on a PIL image: ``size`` ``(h, w)``, or ``(s,)`` for the shorter
    edge (aspect kept, the longer edge truncated, capped at ``max_size``); ``resample``: Pillow's
    filter (antialiased, as torchvision's PIL path always is)."""

    size: tuple[int, ...]
    resample: int
    max_size: int | None = None

    def __call__(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        if len(self.size) == 2:
            new_h, new_w = self.size
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size[0], int(self.size[0] * long / short)
            if self.max_size is not None and new_long > self.max_size:
                new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return im if (new_h, new_w) == (h, w) else im.resize((new_w, new_h), self.resample)


@dataclass(frozen=True)
class CenterCrop:
    """torchvision's ``CenterCrop`` on a PIL image: ``(h, w)`` from the centre (rounded as it
    rounds), zero-padded first where the image is smaller."""

    size: tuple[int, int]

    def __call__(self, im: Image.Image) -> Image.Image:
        ch, cw = self.size
        w, h = im.size
        if cw > w or ch > h:
            left, top = max(cw - w, 0) // 2, max(ch - h, 0) // 2
            right, bottom = (max(cw - w, 0) + 1) // 2, (max(ch - h, 0) + 1) // 2
            im = ImageOps.expand(im, border=(left, top, right, bottom), fill=(0,) * len(im.getbands()))
            w, h = im.size
            if (cw, ch) == (w, h):
                return im
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        return im.crop((left, top, left + cw, top + ch))


@dataclass(frozen=True)
class Geometry:
    """A model's resize and crop, as data: ``to_uint8(pil)`` → ``uint8 [3, H, W]`` (NumPy)."""

    ops: tuple
    image_size: tuple[int, int]

    def to_uint8(self, im: Image.Image) -> np.ndarray:
        im = im.convert("RGB")
        for op in self.ops:
            im = op(im)
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))

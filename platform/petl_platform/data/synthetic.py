"""Deterministic generators mirroring VTAB's structured group (dSprites, SmallNORB, CLEVR).

Each generator is a pure function of ``(n, seed)`` returning ``uint8`` images and int labels,
so every split is reproducible bit for bit on any machine. They probe what natural-image
features encode weakly: position, orientation, 3-D pose and counting.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # native resolution; the shared transform resizes to the model's input size


def _shape_polygon(kind: int, cx: float, cy: float, scale: float, angle: float) -> list:
    """Vertices of a dSprites-like sprite: 0 square, 1 ellipse, 2 heart-ish arrow (asymmetric)."""
    if kind == 0:
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == 1:
        pts = [(math.cos(t) * 1.2, math.sin(t) * 0.7) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    else:  # an arrow: no rotational symmetry, so its orientation is well defined over 360 degrees
        pts = [(1.3, 0), (0, 0.9), (0, 0.4), (-1.2, 0.4), (-1.2, -0.4), (0, -0.4), (0, -0.9)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts]


def dsprites_location(n: int, seed: int, bins: int = 8):
    """White sprite on black; label = horizontal position bin (VTAB dSprites/location)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE), np.uint8)
    labels = rng.integers(0, bins, n)
    for i in range(n):
        scale = rng.uniform(4, 8)
        lo, hi = scale * 1.3 + 1, SIZE - scale * 1.3 - 1
        width = (hi - lo) / bins
        cx = lo + (labels[i] + rng.uniform(0.1, 0.9)) * width
        cy = rng.uniform(lo, hi)
        img = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(img).polygon(_shape_polygon(int(rng.integers(3)), cx, cy, scale, rng.uniform(0, 2 * math.pi)), fill=255)
        images[i] = np.asarray(img)
    return images, labels.astype(np.int64)


def dsprites_orientation(n: int, seed: int, bins: int = 8):
    """An arrow sprite anywhere on the canvas; label = orientation bin over 360 degrees."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE), np.uint8)
    labels = rng.integers(0, bins, n)
    for i in range(n):
        scale = rng.uniform(7, 11)
        angle = (labels[i] + rng.uniform(0.15, 0.85)) * 2 * math.pi / bins
        m = scale * 1.4 + 1
        cx, cy = rng.uniform(m, SIZE - m, 2)
        img = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(img).polygon(_shape_polygon(2, cx, cy, scale, angle), fill=255)
        images[i] = np.asarray(img)
    return images, labels.astype(np.int64)


# An asymmetric toy (a boxy "plane": fuselage, wing, tail fin) so azimuth is identifiable.
_BOXES = [((-1.0, -0.18, -0.18), (1.0, 0.18, 0.18)), ((-0.2, -0.9, -0.05), (0.25, 0.9, 0.05)),
          ((-1.0, -0.05, 0.18), (-0.75, 0.05, 0.6)), ((0.7, -0.12, -0.12), (1.25, 0.12, 0.1))]


def _box_faces(lo, hi):
    x0, y0, z0 = lo
    x1, y1, z1 = hi
    v = np.array([[x, y, z] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return [v[list(q)] for q in quads]


def norb_azimuth(n: int, seed: int, bins: int = 9):
    """SmallNORB-like: a shaded 3-D toy under random elevation and lighting; label = azimuth bin."""
    rng = np.random.default_rng(seed)
    faces = [f for lo, hi in _BOXES for f in _box_faces(lo, hi)]
    images = np.zeros((n, SIZE, SIZE), np.uint8)
    labels = rng.integers(0, bins, n)
    for i in range(n):
        az = (labels[i] + rng.uniform(0.1, 0.9)) * 2 * math.pi / bins
        el = math.radians(rng.uniform(15, 45))
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, math.cos(el), -math.sin(el)], [0, math.sin(el), math.cos(el)]])
        rot = rx @ rz
        light = rng.normal(size=3)
        light[2] = abs(light[2]) + 1.0
        light /= np.linalg.norm(light)
        scale = rng.uniform(17, 23)
        shift = rng.uniform(-3, 3, 2) + SIZE / 2
        img = Image.new("L", (SIZE, SIZE), int(rng.integers(20, 60)))
        draw = ImageDraw.Draw(img)
        drawn = []
        for f in faces:
            p = f @ rot.T
            normal = np.cross(p[1] - p[0], p[2] - p[0])
            normal /= np.linalg.norm(normal) + 1e-9
            if normal[2] <= 0:  # back-face culling; camera looks down -z
                continue
            drawn.append((p[:, 2].mean(), p, max(0.0, float(normal @ light))))
        for _, p, shade in sorted(drawn, key=lambda t: t[0]):  # painter's algorithm
            pts = [(shift[0] + scale * x, shift[1] - scale * y) for x, y, _ in p]
            draw.polygon(pts, fill=int(70 + 180 * shade))
        images[i] = np.asarray(img)
    return images, labels.astype(np.int64)


_COLORS = np.array([[220, 40, 40], [40, 170, 60], [50, 80, 220], [230, 200, 40], [160, 60, 200],
                    [40, 200, 200], [240, 140, 30], [200, 200, 200]], np.uint8)


def clevr_count(n: int, seed: int, min_count: int = 3, max_count: int = 10):
    """CLEVR-like: 3..10 non-overlapping coloured objects on grey; label = count - 3."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    labels = rng.integers(0, max_count - min_count + 1, n)
    for i in range(n):
        img = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in rng.integers(90, 140, 3)))
        draw = ImageDraw.Draw(img)
        placed: list[tuple[float, float, float]] = []
        while len(placed) < labels[i] + min_count:
            r = rng.uniform(3.0, 5.5)
            x, y = rng.uniform(r + 1, SIZE - r - 1, 2)
            if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 1.5) ** 2 for a, b, c in placed):
                placed.append((x, y, r))
                color = tuple(int(c) for c in _COLORS[rng.integers(len(_COLORS))])
                box = (x - r, y - r, x + r, y + r)
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        images[i] = np.asarray(img)
    return images, labels.astype(np.int64)

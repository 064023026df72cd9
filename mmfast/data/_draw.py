"""Drawing the synthetic world's objects: one mask function per class, colours, backgrounds.

Every class draws a white-on-black ``L`` mask inside its box (holes are cut with 0). The image is
then painted through the mask, so one drawing gives the pixels, the tight box and the area at once,
and cut-outs never erase the background or objects underneath.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in canvas pixels


def _poly(d: ImageDraw.ImageDraw, box: Box, pts, fill: int = 255) -> None:
    """Polygon with vertices given in box-relative [0, 1] coordinates."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.polygon([(x0 + u * w, y0 + v * h) for u, v in pts], fill=fill)


def _ell(d: ImageDraw.ImageDraw, box: Box, u0, v0, u1, v1, fill: int = 255, width: int = 0) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    xy = [x0 + u0 * w, y0 + v0 * h, x0 + u1 * w, y0 + v1 * h]
    if width:
        d.ellipse(xy, outline=fill, width=width)
    else:
        d.ellipse(xy, fill=fill)


def _rect(d: ImageDraw.ImageDraw, box: Box, u0, v0, u1, v1, fill: int = 255) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.rectangle([x0 + u0 * w, y0 + v0 * h, x0 + u1 * w, y0 + v1 * h], fill=fill)


def _star_pts(n: int = 5, inner: float = 0.42):
    pts = []
    for i in range(2 * n):
        r = 0.5 if i % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((0.5 + r * math.cos(a), 0.53 + r * math.sin(a)))
    return pts


def _heart_pts(k: int = 40):
    pts = []
    for i in range(k):
        t = 2 * math.pi * i / k
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((0.5 + x / 34.0, 0.45 - y / 34.0))
    return pts


_STAR = _star_pts()
_HEART = _heart_pts()


def circle(d, b):
    _ell(d, b, 0, 0, 1, 1)


def square(d, b):
    _rect(d, b, 0.05, 0.05, 0.95, 0.95)


def triangle(d, b):
    _poly(d, b, [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)])


def star(d, b):
    _poly(d, b, _STAR)


def heart(d, b):
    _poly(d, b, _HEART)


def cross(d, b):
    _rect(d, b, 0.34, 0.0, 0.66, 1.0)
    _rect(d, b, 0.0, 0.34, 1.0, 0.66)


def diamond(d, b):
    _poly(d, b, [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)])


def ring(d, b):
    _ell(d, b, 0, 0, 1, 1)
    _ell(d, b, 0.27, 0.27, 0.73, 0.73, fill=0)


def moon(d, b):
    _ell(d, b, 0, 0, 1, 1)
    _ell(d, b, 0.3, -0.08, 1.25, 0.86, fill=0)


def arrow(d, b):
    _poly(
        d, b, [(0.0, 0.36), (0.55, 0.36), (0.55, 0.08), (1.0, 0.5), (0.55, 0.92), (0.55, 0.64), (0.0, 0.64)]
    )


def tree(d, b):
    _rect(d, b, 0.4, 0.7, 0.6, 1.0)
    _poly(d, b, [(0.5, 0.0), (0.85, 0.4), (0.15, 0.4)])
    _poly(d, b, [(0.5, 0.2), (1.0, 0.75), (0.0, 0.75)])


def house(d, b):
    _poly(d, b, [(0.5, 0.0), (1.0, 0.45), (0.0, 0.45)])
    _rect(d, b, 0.12, 0.44, 0.88, 1.0)
    _rect(d, b, 0.4, 0.62, 0.6, 1.0, fill=0)


def car(d, b):
    _rect(d, b, 0.0, 0.45, 1.0, 0.8)
    _poly(d, b, [(0.22, 0.45), (0.32, 0.15), (0.68, 0.15), (0.8, 0.45)])
    _ell(d, b, 0.1, 0.62, 0.38, 0.98)
    _ell(d, b, 0.62, 0.62, 0.9, 0.98)


def flower(d, b):
    for i in range(6):
        a = i * math.pi / 3
        cu, cv = 0.5 + 0.3 * math.cos(a), 0.5 + 0.3 * math.sin(a)
        _ell(d, b, cu - 0.2, cv - 0.2, cu + 0.2, cv + 0.2)
    _ell(d, b, 0.38, 0.38, 0.62, 0.62, fill=0)
    _ell(d, b, 0.43, 0.43, 0.57, 0.57)


def cup(d, b):
    _poly(d, b, [(0.0, 0.1), (0.72, 0.1), (0.64, 1.0), (0.08, 1.0)])
    _ell(d, b, 0.5, 0.25, 1.0, 0.75)
    _ell(d, b, 0.66, 0.4, 0.86, 0.6, fill=0)


def fish(d, b):
    _ell(d, b, 0.0, 0.2, 0.75, 0.8)
    _poly(d, b, [(0.62, 0.5), (1.0, 0.15), (1.0, 0.85)])
    _ell(d, b, 0.14, 0.38, 0.24, 0.48, fill=0)


# Category-id order (id = index + 1). The Zipf prior runs over this order; themes reshuffle it a little.
SHAPES = {
    "circle": circle,
    "star": star,
    "square": square,
    "tree": tree,
    "car": car,
    "house": house,
    "heart": heart,
    "triangle": triangle,
    "cup": cup,
    "flower": flower,
    "moon": moon,
    "fish": fish,
    "diamond": diamond,
    "cross": cross,
    "ring": ring,
    "arrow": arrow,
}
CLASSES: list[str] = list(SHAPES)

# Width/height aspect of each class's box, so icons keep their look at any size.
ASPECT = {"car": 1.45, "fish": 1.5, "arrow": 1.4, "tree": 0.8, "cup": 1.05}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 190),
    "pink": (250, 120, 185),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "brown": (125, 75, 35),
}
# Typical colours make the world a little more like photos (trees are mostly green).
TYPICAL_COLORS = {
    "tree": ["green", "brown"],
    "heart": ["red", "pink"],
    "moon": ["yellow", "white"],
    "star": ["yellow", "orange"],
    "fish": ["orange", "blue"],
    "flower": ["pink", "purple"],
    "car": ["red", "blue"],
    "house": ["brown", "orange"],
    "cup": ["white", "blue"],
}


def color_distance(a, b) -> float:
    return float(np.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    return yy, xx


def background(
    rng: np.random.Generator, size: int, base: tuple[int, int, int], scale: int = 1
) -> Image.Image:
    """A base colour with a random linear gradient and mild pixel noise, drawn at ``size`` and
    enlarged ``scale`` times by pixel repetition (a later box downsample gives the pixels back)."""
    yy, xx = _grid(size)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(ang) * xx + np.sin(ang) * yy  # (S, S), in [-1.4, 1.4]
    tint = rng.uniform(-25, 25, size=3).astype(np.float32)
    arr = np.asarray(base, np.float32)[None, None, :] + ramp[..., None] * tint[None, None, :]  # (S, S, 3)
    arr += rng.uniform(1, 4.5) * rng.standard_normal(arr.shape, dtype=np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img if scale == 1 else img.resize((size * scale, size * scale), Image.NEAREST)


def object_mask(cls: str, canvas: int, box: Box) -> Image.Image:
    mask = Image.new("L", (canvas, canvas), 0)
    SHAPES[cls](ImageDraw.Draw(mask), box)
    return mask


def shape(cls: str, canvas: int, box: Box):
    """(mask, tight box (x0, y0, x1, y1), area in pixels) of one object, or None if it is invisible."""
    mask = object_mask(cls, canvas, box)
    tight = mask.getbbox()
    if tight is None:
        return None
    return mask, tight, int(np.count_nonzero(np.asarray(mask) > 127))


def paint(img: Image.Image, cls: str, box: Box, rgb: tuple[int, int, int]):
    """Paint one object; returns (tight box, area) or None if it is invisible."""
    res = shape(cls, img.size[0], box)
    if res is None:
        return None
    img.paste(rgb, (0, 0), res[0])
    return res[1], res[2]

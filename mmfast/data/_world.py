"""The synthetic world's classes, themes and class priors: what ``synthetic.py`` draws from and what the
media and text writers (``_media.py``, ``_worldfiles.py``) sample with, in one module below all three."""
from __future__ import annotations

import numpy as np

from mmfast.data import _draw

CLASSES = _draw.CLASSES
ZIPF_EXPONENT = 1.0
THEME_P = 0.85  # probability an object is drawn from its image's theme rather than the global prior

THEMES: dict[str, tuple[list[str], list[tuple[int, int, int]]]] = {
    "sky": (["star", "moon", "circle", "ring"], [(20, 25, 60), (40, 50, 95), (12, 12, 30)]),
    "street": (["car", "house", "tree", "arrow"], [(150, 150, 150), (115, 115, 120), (175, 170, 160)]),
    "garden": (["flower", "tree", "heart", "house"], [(185, 225, 165), (145, 195, 125), (220, 240, 200)]),
    "table": (["cup", "square", "diamond", "cross"], [(230, 215, 185), (200, 175, 145), (240, 235, 225)]),
    "pond": (["fish", "flower", "ring", "triangle"], [(150, 200, 235), (105, 165, 210), (195, 225, 245)]),
}
THEME_NAMES = list(THEMES)


def zipf_prior() -> np.ndarray:
    w = 1.0 / np.arange(1, len(CLASSES) + 1) ** ZIPF_EXPONENT
    return w / w.sum()


def _theme_weights(theme: str) -> np.ndarray:
    z = zipf_prior()
    mask = np.array([c in THEMES[theme][0] for c in CLASSES], dtype=np.float64)
    w = z * mask
    return w / w.sum()


def class_prior() -> np.ndarray:
    """Expected share of objects per class (category-id order) under the generator's mixture."""
    theme_mix = np.mean([_theme_weights(t) for t in THEME_NAMES], axis=0)
    return THEME_P * theme_mix + (1 - THEME_P) * zipf_prior()

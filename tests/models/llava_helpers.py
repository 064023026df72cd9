"""Shared by the LLaVA test files (pytest puts this folder on sys.path): import it as ``llava_helpers``."""
from __future__ import annotations


def square_image(color=(200, 30, 30), size=(40, 30)):
    """A blue PIL image (``size``, not square: the processor's padding runs) with a 12-px square of ``color``."""
    from PIL import Image

    img = Image.new("RGB", size, (20, 120, 200))
    img.paste(Image.new("RGB", (12, 12), color), (5, 5))
    return img

"""Image-text pairs from a CSV/TSV file (open_clip's ``--csv-img-key/--csv-caption-key`` layout).

The first row is a header naming at least the image and caption columns. Image paths are relative to
``root`` (default: the CSV's folder) and may not leave it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from mmfast.utils.io import open_image, safe_join


def read_image_text_csv(
    csv_path: str | os.PathLike, img_key: str = "filepath", caption_key: str = "caption", sep: str = ","
) -> list[tuple[str, str]]:
    """Return ``[(relative_image_path, caption)]``; errors name the file and line."""
    return [(path, cap) for _, path, cap in _read_rows(Path(csv_path), img_key, caption_key, sep)]


def _read_rows(p: Path, img_key: str, caption_key: str, sep: str) -> list[tuple[int, str, str]]:
    """``[(line_number, path, caption)]``."""
    if not p.is_file():
        raise FileNotFoundError(f"image-text CSV not found: {p}")
    rows: list[tuple[int, str, str]] = []
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(
                f"image-text CSV {p} is empty; expected a header with {img_key!r} and {caption_key!r}"
            )
        for key in (img_key, caption_key):
            if key not in header:
                raise ValueError(f"image-text CSV {p} line 1: header {header} has no column {key!r}")
        ii, ci = header.index(img_key), header.index(caption_key)
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"image-text CSV {p} line {line}: {len(row)} fields, expected {len(header)}")
            if not row[ii]:
                raise ValueError(f"image-text CSV {p} line {line}: empty {img_key!r}")
            if not row[ci].strip():
                raise ValueError(f"image-text CSV {p} line {line}: empty {caption_key!r}")
            rows.append((line, row[ii], row[ci]))
    if not rows:
        raise ValueError(f"image-text CSV {p} has a header but no rows")
    return rows


def _torch_dataset_base():
    try:
        from torch.utils.data import Dataset
    except ImportError:  # the loaders also work without torch, as plain sequences
        return object
    return Dataset


class ImageTextDataset(_torch_dataset_base()):
    """``(image, text)`` pairs: ``transform(PIL image)`` or the PIL image, ``tokenizer([caption])[0]`` or the caption.

    Paths are checked twice, and errors name the CSV line: on construction, absolute paths and
    ``..`` parts are refused (a string check, cheap for large files); on read, ``safe_join`` also
    resolves links against ``root``.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        img_key: str = "filepath",
        caption_key: str = "caption",
        sep: str = ",",
    ):
        self.csv_path = Path(csv_path)
        self.root = Path(root) if root is not None else self.csv_path.parent
        triples = _read_rows(self.csv_path, img_key, caption_key, sep)
        for line, rel, _ in triples:
            parts = rel.replace("\\", "/").split("/")
            if rel.startswith(("/", "\\")) or Path(rel).is_absolute() or ".." in parts:
                raise ValueError(
                    f"image-text CSV {self.csv_path} line {line}: {img_key} {rel!r} must be a path inside {self.root}"
                )
        self.lines = [line for line, _, _ in triples]
        self.rows = [(rel, cap) for _, rel, cap in triples]
        self.transform = transform
        self.tokenizer = tokenizer
        self._img_key = img_key

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, idx: int) -> Path:
        rel = self.rows[idx][0]
        return safe_join(self.root, rel, what=f"{self.csv_path} line {self.lines[idx]} {self._img_key}")

    def __getitem__(self, idx: int):
        image = open_image(self.image_path(idx))
        caption = self.rows[idx][1]
        if self.transform is not None:
            image = self.transform(image)
        text = self.tokenizer([caption])[0] if self.tokenizer is not None else caption
        return image, text

    @property
    def captions(self) -> list[str]:
        return [c for _, c in self.rows]

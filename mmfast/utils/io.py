"""Careful file handling: atomic writes, paths kept inside their root, safe weight loading."""
from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Decoded images larger than this many pixels are refused (decompression bombs).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw) -> Iterator[Any]:
    """Write to a temporary file beside ``path`` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def safe_join(root: str | os.PathLike, relative: str, *, what: str = "path") -> Path:
    """Join a dataset-relative path to ``root``, refusing absolute paths and ``..`` or symlink escapes; the
    result is resolved (``Path.resolve``). String operations and a cached resolved root: a loader calls it for
    each of tens of thousands of records."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what} must be a non-empty relative path string, got {relative!r}")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise ValueError(f"{what} {relative!r} is absolute; expected a path relative to {root}")
    root_r = _resolved_root(os.getcwd(), os.fspath(root))
    full = os.path.realpath(os.path.join(root_r, relative))
    if full != root_r and not full.startswith(root_r.rstrip(os.sep) + os.sep):
        raise ValueError(f"{what} {relative!r} escapes its root {root}")
    return Path(full)


@functools.lru_cache(maxsize=64)
def _resolved_root(cwd: str, root: str) -> str:
    """``root`` resolved once per (working directory, root)."""
    return str(Path(root).resolve())


def load_state_dict(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    """Load weights from ``.safetensors`` or a torch pickle with ``weights_only=True``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device=map_location)
    return torch.load(p, map_location=map_location, weights_only=True)


def open_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open an image as RGB, refusing files that decode to more than ``max_pixels``."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    with Image.open(p) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"image {p} is {w}x{h} = {w * h} pixels; the cap is {max_pixels}")
        return im.convert("RGB")


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {p} is malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def read_jsonl(path: str | os.PathLike, *, what: str = "JSONL file") -> list:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what} {p} line {i} is malformed JSON: {e.msg}") from e
    return out

"""Image-text webdataset shards read and written with the stdlib ``tarfile``.

A shard is a plain tar file; a sample is the group of members sharing a key, the member name up to
the first dot of its base name (``dir/000123.png`` + ``dir/000123.txt`` -> key ``dir/000123``), as in
the ``webdataset`` package. Members are read into memory, never extracted to disk, so member names
cannot write outside anything.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

from mmfast.data.imagetext import _torch_dataset_base
from mmfast.utils.io import MAX_IMAGE_PIXELS, atomic_open

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
TEXT_EXTS = ("txt",)


def expand_shards(spec: str | os.PathLike | Iterable) -> list[Path]:
    """``"dir/shard-{000000..000003}.tar"`` (brace range), a single path, or a list of paths."""
    if not isinstance(spec, (str, os.PathLike)):
        return [p for s in spec for p in expand_shards(s)]
    s = str(spec)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", s)
    if not m:
        return [Path(s)]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    if hi < lo:
        raise ValueError(f"shard spec {s!r}: range {lo}..{hi} is empty")
    return [
        p for i in range(lo, hi + 1) for p in expand_shards(s[: m.start()] + f"{i:0{width}d}" + s[m.end() :])
    ]


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower() if dot else ""


def decode_image(data: bytes, where: str, max_pixels: int = MAX_IMAGE_PIXELS):
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types for undecodable bytes
        raise ValueError(f"{where}: not a readable image ({e})") from e
    w, h = im.size
    if w * h > max_pixels:
        raise ValueError(f"{where}: image is {w}x{h} = {w * h} pixels; the cap is {max_pixels}")
    return im.convert("RGB")


def index_shard(path: Path) -> list[tuple[str, str, str]]:
    """``[(key, image_member, text_member)]`` of one shard, in member order."""
    if not path.is_file():
        raise FileNotFoundError(f"webdataset shard not found: {path}")
    try:
        with tarfile.open(path, "r:*") as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
    except tarfile.TarError as e:
        raise ValueError(f"webdataset shard {path} is not a readable tar file: {e}") from e
    samples: dict[str, dict[str, str]] = {}
    for m in members:
        key, ext = split_name(m.name)
        samples.setdefault(key, {})[ext] = m.name
    out = []
    for key, parts in samples.items():
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        txt = next((parts[e] for e in TEXT_EXTS if e in parts), None)
        if img is None or txt is None:
            missing = f"image ({'/'.join(IMAGE_EXTS)})" if img is None else "caption (.txt)"
            raise ValueError(
                f"webdataset shard {path} sample {key!r} has no {missing}; members: {sorted(parts)}"
            )
        out.append((key, img, txt))
    return out


class TarImageTextDataset(_torch_dataset_base()):
    """Map-style ``(image, text)`` pairs from webdataset shards, with the same transform/tokenizer
    contract as ``ImageTextDataset``. Shards are indexed once; each worker opens its own handles."""

    def __init__(self, shards, transform: Callable | None = None, tokenizer: Callable | None = None):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("no webdataset shards given")
        self.index = [(s, key, img, txt) for s in self.shards for key, img, txt in index_shard(s)]
        if not self.index:
            raise ValueError(f"webdataset shards {[str(s) for s in self.shards]} hold no samples")
        self.transform = transform
        self.tokenizer = tokenizer
        self._handles: dict[Path, tarfile.TarFile] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, shard: Path, member: str) -> bytes:
        if self._pid != os.getpid():  # tar handles must not be shared across forked workers
            self._handles, self._pid = {}, os.getpid()
        tf = self._handles.get(shard)
        if tf is None:
            tf = self._handles[shard] = tarfile.open(shard, "r:*")  # noqa: SIM115
        f = tf.extractfile(member)
        if f is None:
            raise ValueError(f"webdataset shard {shard} member {member!r} is not a regular file")
        return f.read()

    def sample(self, idx: int) -> tuple[str, object, str]:
        shard, key, img, txt = self.index[idx]
        image = decode_image(self._read(shard, img), f"webdataset shard {shard} member {img!r}")
        caption = self._read(shard, txt).decode("utf-8").strip()
        return key, image, caption

    def __getitem__(self, idx: int):
        _, image, caption = self.sample(idx)
        if self.transform is not None:
            image = self.transform(image)
        return image, (self.tokenizer([caption])[0] if self.tokenizer is not None else caption)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata keeps shards byte-identical across runs
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[tuple[str, bytes, str, str]],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    maxcount: int = 1000,
) -> list[Path]:
    """Write ``(key, image_bytes, image_ext, caption)`` samples into ``{prefix}-NNNNNN.tar`` files."""
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out, paths = Path(out_dir), []
    buf: list[tuple[str, bytes, str, str]] = []

    def flush() -> None:
        path = out / f"{prefix}-{len(paths):06d}.tar"
        with (
            atomic_open(path, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf,
        ):
            for key, img, ext, cap in buf:
                _add(tf, f"{key}.{ext}", img)
                _add(tf, f"{key}.txt", cap.encode("utf-8"))
        paths.append(path)
        buf.clear()

    for key, img, ext, cap in samples:
        if "." in key.rpartition("/")[2] or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and have no dot in its base name")
        if ext.lower() not in IMAGE_EXTS:
            raise ValueError(f"sample {key!r}: image extension {ext!r} is not one of {IMAGE_EXTS}")
        buf.append((key, img, ext, cap))
        if len(buf) == maxcount:
            flush()
    if buf:
        flush()
    return paths


def csv_to_shards(
    csv_path, out_dir, root=None, maxcount: int = 1000, prefix: str = "shard", **csv_kw
) -> list[Path]:
    """Pack an image-text CSV (see ``imagetext``) into shards, one sample per row."""
    from mmfast.data.imagetext import ImageTextDataset

    ds = ImageTextDataset(csv_path, root=root, **csv_kw)

    def gen():
        for i, (_, cap) in enumerate(ds.rows):
            p = ds.image_path(i)
            yield f"{i:09d}", p.read_bytes(), p.suffix.lstrip(".").lower(), cap

    return write_shards(gen(), out_dir, prefix=prefix, maxcount=maxcount)

"""Audio, video and text->media pairs (NExT-GPT's T2X data) read without extra packages.

Audio is 16-bit PCM WAV read with the stdlib ``wave`` module; video is an animated GIF (or any
multi-frame image Pillow opens) or a folder of frame images. A T2X file is a JSON list of
``{"caption", "<modality>_name": relative path, ...}`` records (NExT-GPT's cc3m/audiocap/webvid
layout); a plain ``"<modality>"`` key is accepted too.
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

from mmfast.utils.io import MAX_IMAGE_PIXELS, open_image, read_json, safe_join

MODALITIES = ("image", "audio", "video")
FRAME_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """``(T,)`` float32 mono samples in [-1, 1] (channels averaged) and the sample rate."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"audio file not found: {p}")
    try:
        with wave.open(str(p), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"audio file {p}: {8 * w.getsampwidth()}-bit samples, expected 16-bit PCM")
            ch, rate, data = w.getnchannels(), w.getframerate(), w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"audio file {p} is not a readable WAV file: {e}") from e
    x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0
    return x.reshape(-1, ch).mean(axis=1), rate


def read_video(path: str | os.PathLike, max_frames: int = 64, max_pixels: int = MAX_IMAGE_PIXELS) -> list:
    """RGB PIL frames of an animated image file or a folder of frame images (sorted by name)."""
    from PIL import Image, ImageSequence

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in FRAME_EXTS)
        if not files:
            raise ValueError(f"video folder {p} holds no frame images ({', '.join(FRAME_EXTS)})")
        return [open_image(f, max_pixels) for f in files[:max_frames]]
    if not p.is_file():
        raise FileNotFoundError(f"video not found: {p}")
    try:
        im = Image.open(p)
    except Exception as e:  # PIL raises several types for undecodable bytes
        raise ValueError(f"video {p} is not a readable animated image: {e}") from e
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"video {p} is {w}x{h} = {w * h} pixels per frame; the cap is {max_pixels}")
        return [f.convert("RGB") for _, f in zip(range(max_frames), ImageSequence.Iterator(im))]


def load_t2x_json(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    modality: str | None = None,
    *,
    check_files: bool = True,
) -> list[dict]:
    """Validated text->media records; each gains ``path`` (absolute, inside ``root``, default the file's folder).

    ``modality`` defaults to whichever of image/audio/video the first record holds; every record must
    hold the same one. Errors name the file, record index and field.
    """
    p = Path(path)
    data = read_json(p, what="T2X JSON file")
    if not isinstance(data, list):
        raise ValueError(f"T2X JSON file {p}: expected a list of records, got {type(data).__name__}")  # noqa: TRY004
    if modality is None and data and isinstance(data[0], dict):
        modality = next((m for m in MODALITIES if m in data[0] or f"{m}_name" in data[0]), None)
    if modality not in MODALITIES:
        raise ValueError(f"T2X JSON file {p}: modality must be one of {MODALITIES}, got {modality!r}")
    root = Path(root) if root is not None else p.parent
    out = []
    for i, rec in enumerate(data):
        where = f"T2X JSON file {p} record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")  # noqa: TRY004
        if not isinstance(rec.get("caption"), str) or not rec["caption"].strip():
            raise ValueError(f"{where}: missing string field 'caption'")
        key = f"{modality}_name" if f"{modality}_name" in rec else modality
        if key not in rec:
            raise ValueError(f"{where}: missing field '{modality}_name'")
        full = safe_join(root, rec[key], what=f"{where} field {key!r}")
        if check_files and not full.exists():
            raise FileNotFoundError(f"{where} field {key!r}: {full} not found")
        out.append({**rec, "path": str(full)})
    return out


def world_t2x(world: str | os.PathLike, modality: str, split: str) -> tuple[list[dict], list[str]]:
    """A synthetic world's ``split`` records of ``t2x_{modality}.json`` (validated, each with its ``path``) and the
    world's class names; a world made without media is named with the command that makes one."""
    root = Path(world)
    f = root / f"t2x_{modality}.json"
    if not f.is_file():
        raise FileNotFoundError(f"--data {root}: no {f.name} (make the world with media: mmfast data synth "
                                "without --no-media)")
    classes = read_json(root / "classes.json", what="class list")
    return [r for r in load_t2x_json(f, root, modality) if r.get("split", split) == split], classes

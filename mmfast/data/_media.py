"""Audio and video of the synthetic world, and the text->media pairs NExT-GPT trains on.

Audio: each class has its own (pitch, timbre, rhythm) triple, so a clip identifies its class.
Video: animated GIFs of one or two objects moving in a straight line; the caption says which way.
T2X records use NExT-GPT's field names (``image_name``/``audio_name``/``video_name`` and ``caption``).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from PIL import Image

from mmfast.data import _draw, _text
from mmfast.utils.io import atomic_write_json

SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0
TIMBRES = ["pure", "hollow", "buzzing", "ringing"]
DIRECTIONS = {"to the right": (1, 0), "to the left": (-1, 0), "up": (0, -1), "down": (0, 1)}


def class_sound(k: int) -> tuple[float, str, int]:
    """(base pitch Hz, timbre, beats per clip) of class ``k``: 16 distinct triples."""
    return 220.0 * 2 ** (k * 1.5 / 12), TIMBRES[k % 4], 1 + (k // 4)


def synth_clip(k: int, rng: np.random.Generator) -> np.ndarray:
    """(T,) float32 in [-1, 1]: the class pattern with jittered pitch, loudness and noise."""
    f0, timbre, beats = class_sound(k)
    f0 *= rng.uniform(0.98, 1.02)
    n = int(SAMPLE_RATE * AUDIO_SECONDS)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    if timbre == "pure":
        partials = [(1.0, 1.0)]
    elif timbre == "hollow":  # odd harmonics: square-like
        partials = [(h, 1.0 / h) for h in (1, 3, 5, 7)]
    elif timbre == "buzzing":  # all harmonics: sawtooth-like
        partials = [(h, 1.0 / h) for h in range(1, 7)]
    else:  # inharmonic partials: bell-like
        partials = [(1.0, 1.0), (2.76, 0.5), (5.4, 0.25)]
    tone = sum(a * np.sin(2 * np.pi * f0 * m * t) for m, a in partials)
    # Rhythm: `beats` equal notes, each with a fast attack and exponential decay.
    period = AUDIO_SECONDS / beats
    local = np.mod(t, period)
    env = np.minimum(1.0, local / 0.01) * np.exp(-local / (0.35 * period))
    sig = tone * env
    sig = sig / (np.abs(sig).max() + 1e-9) * rng.uniform(0.5, 0.85)
    sig = sig + rng.normal(0, 0.005, size=n)
    return np.clip(sig, -1, 1).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _video(rng: np.random.Generator, size: int, frames: int) -> tuple[list[Image.Image], str]:
    from mmfast.data._world import CLASSES, class_prior

    bg = tuple(int(c) for c in rng.integers(0, 256, size=3))
    n = 1 + int(rng.random() < 0.4)
    movers = []
    for _ in range(n):
        cls = CLASSES[int(rng.choice(len(CLASSES), p=class_prior()))]
        names = [c for c in _draw.COLORS if _draw.color_distance(_draw.COLORS[c], bg) >= 110] or list(
            _draw.COLORS
        )
        color = names[int(rng.integers(len(names)))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        s = size * rng.uniform(0.25, 0.4)
        asp = _draw.ASPECT.get(cls, 1.0)
        w, h = (s, s / asp) if asp >= 1 else (s * asp, s)
        dx, dy = DIRECTIONS[direction]
        # Start on the side opposite the motion so the path stays inside the frame.
        x0 = (1 if dx > 0 else size - w - 1) if dx else rng.uniform(1, size - w - 1)
        y0 = (1 if dy > 0 else size - h - 1) if dy else rng.uniform(1, size - h - 1)
        span = ((size - w - 2) * dx, (size - h - 2) * dy)
        movers.append((cls, color, direction, (x0, y0, w, h), span))
    ss = 2
    out = []
    for f in range(frames):
        a = f / max(frames - 1, 1)
        img = Image.new("RGB", (size * ss, size * ss), bg)
        for cls, color, _, (x0, y0, w, h), (sx, sy) in movers:
            x, y = x0 + a * sx, y0 + a * sy
            _draw.paint(img, cls, (x * ss, y * ss, (x + w) * ss, (y + h) * ss), _draw.COLORS[color])
        out.append(img.resize((size, size), Image.BOX))
    caption = " and ".join(f"{_text.article(color + ' ' + cls)} moving {d}" for cls, color, d, _, _ in movers)
    return out, caption


def audio_records(out: Path, seed: int, audio_per_class: int) -> list[dict]:
    """Write ``audio_per_class`` clips of every class under ``out/audio`` and return their text->audio records."""
    from mmfast.data._world import CLASSES

    t2x_audio = []
    for k, cls in enumerate(CLASSES):
        _, timbre, beats = class_sound(k)
        for v in range(audio_per_class):
            rng = np.random.default_rng([seed, 2_000_000 + k, v])
            rel = f"audio/{cls}_{v:02d}.wav"
            write_wav(out / rel, synth_clip(k, rng))
            # The last variant of each class is held out, so val audio covers every class.
            split = "val" if v == audio_per_class - 1 and audio_per_class > 1 else "train"
            beat_word = "once" if beats == 1 else f"{_text.NUMBER_WORDS[beats]} times"
            cap = f"the sound of {_text.article(cls)}: a {timbre} tone beeping {beat_word}"
            t2x_audio.append({"id": f"{cls}_{v:02d}", "caption": cap, "audio_name": rel, "split": split})
    return t2x_audio


def video_records(out: Path, seed: int, size: int, n_videos: int, frames: int) -> list[dict]:
    """Write ``n_videos`` GIFs of ``frames`` frames under ``out/video`` (the last fifth held out as ``val``) and
    return their text->video records."""
    n_val = max(1, n_videos // 5) if n_videos > 1 else 0
    t2x_video = []
    (Path(out) / "video").mkdir(parents=True, exist_ok=True)
    for i in range(n_videos):
        split, j = ("train", i) if i < n_videos - n_val else ("val", i - (n_videos - n_val))
        ims, cap = _video(np.random.default_rng([seed, 3_000_000 + i]), size, frames)
        rel = f"video/{split}_{j:06d}.gif"
        ims[0].save(Path(out) / rel, save_all=True, append_images=ims[1:], duration=125, loop=0)
        t2x_video.append({"id": f"video_{i:06d}", "caption": cap, "video_name": rel, "split": split})
    return t2x_video


def write_videos(out: Path, seed: int, size: int, n_videos: int, frames: int = 4) -> dict:
    """Only the world's videos: the GIFs and ``t2x_video.json`` (the same files ``write_media`` writes for them)."""
    t2x_video = video_records(Path(out), seed, size, n_videos, frames)
    atomic_write_json(Path(out) / "t2x_video.json", t2x_video, indent=None)
    return {"n_videos": len(t2x_video)}


def write_audio(out: Path, seed: int, audio_per_class: int = 4) -> dict:
    """Only the world's audio: the clips and ``t2x_audio.json`` (the same files ``write_media`` writes for them)."""
    t2x_audio = audio_records(Path(out), seed, audio_per_class)
    atomic_write_json(Path(out) / "t2x_audio.json", t2x_audio, indent=None)
    return {"n_audio": len(t2x_audio)}


def write_media(
    out: Path,
    splits: dict,
    seed: int,
    size: int,
    *,
    n_videos: int | None = None,
    audio_per_class: int = 4,
    video_frames: int = 8,
) -> dict:
    t2x_image = []
    for split, items in splits.items():
        for image_id, rel, scene in items:
            cap = _text.captions(scene, np.random.default_rng([seed, image_id, 3]), 1)[0]
            t2x_image.append({"id": f"{image_id:06d}", "caption": cap, "image_name": rel, "split": split})

    t2x_audio = audio_records(out, seed, audio_per_class)

    n_img = sum(len(v) for v in splits.values())
    n_videos = max(8, n_img // 20) if n_videos is None else n_videos
    t2x_video = video_records(out, seed, size, n_videos, video_frames)

    atomic_write_json(out / "t2x_image.json", t2x_image, indent=None)
    atomic_write_json(out / "t2x_audio.json", t2x_audio, indent=None)
    atomic_write_json(out / "t2x_video.json", t2x_video, indent=None)
    return {"n_audio": len(t2x_audio), "n_videos": n_videos}

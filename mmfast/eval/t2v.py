"""The judges of text->video (issue #24): which object each frame shows, and which way it moves.

The world's videos (:func:`mmfast.data._media._video`) move one or two objects in a straight line over a plain
background; their captions say "a red car moving to the left" (and a second mover after " and "). Generated
clips are judged on single-mover prompts:

* class: the demo CLIP's zero-shot top-1 of every frame against the requested class (as ``mmfast eval t2i``
  judges an image), averaged over frames;
* direction: :func:`motion_direction`, from the frames alone: the background is the median colour of the first
  frame's border, each pixel weighs by its colour distance from it, and the weighted centroid's path from the
  first to the last frame points to the right, left, up or down (None when it moves less than 2 pixels).

    movers = parse_caption(caption, classes)        # [(class, direction)]
    motion_direction(frames)                        # frames: (F, H, W, 3) floats in [0, 1]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmfast.data._media import DIRECTIONS

MIN_PATH_PX = 2.0  # the world's movers travel 15-22 px of a 32-px frame


def parse_caption(caption: str, classes: list[str]) -> list[tuple[str, str]]:
    """``[(class, direction)]`` of a world video caption, one per mover; a clear error for anything else."""
    out = []
    for part in caption.split(" and "):
        words = part.split(" moving ")
        if len(words) != 2 or words[1] not in DIRECTIONS:
            raise ValueError(f"caption {caption!r}: {part!r} is not '<a colour class> moving <direction>'")
        cls = words[0].split()[-1]
        if cls not in classes:
            raise ValueError(f"caption {caption!r}: {cls!r} is not a class of the world")
        out.append((cls, words[1]))
    return out


def motion_direction(frames) -> str | None:
    """The direction (a key of ``DIRECTIONS``) in which the foreground of ``frames`` (F, H, W, 3) moves."""
    x = torch.as_tensor(np.ascontiguousarray(frames), dtype=torch.float64)
    if x.dim() != 4 or x.shape[-1] != 3 or x.shape[0] < 2:
        raise ValueError(f"frames must be (F >= 2, H, W, 3), got {tuple(x.shape)}")
    first = x[0]
    border = torch.cat([first[0], first[-1], first[:, 0], first[:, -1]])  # (2W + 2H, 3)
    bg = border.median(0).values
    weight = (x - bg).norm(dim=-1)  # (F, H, W)
    # The world's objects differ from their background by >= 110/255 in RGB distance: below 0.3, noise, not object
    weight = torch.where(weight > 0.3, weight, 0.0)
    h, w = weight.shape[1:]
    ys, xs = torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype)
    mass = weight.sum((1, 2)).clamp_min(1e-9)
    cx = (weight.sum(1) * xs).sum(-1) / mass
    cy = (weight.sum(2) * ys).sum(-1) / mass
    dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
    if max(abs(dx), abs(dy)) < MIN_PATH_PX:
        return None
    step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
    return next(name for name, d in DIRECTIONS.items() if d == step)


def load_videos(world: str | Path, split: str = "val", single: bool = True) -> tuple[list[np.ndarray], list[str],
                                                                                   list[list[tuple[str, str]]]]:
    """``split``'s videos as (F, H, W, 3) float arrays in [0, 1], their captions and movers (single movers only
    with ``single``), from ``t2x_video.json``."""
    from mmfast.data.media import read_video, world_t2x

    records, classes = world_t2x(world, "video", split)
    videos, captions, movers = [], [], []
    for r in records:
        m = parse_caption(r["caption"], classes)
        if single and len(m) != 1:
            continue
        frames = read_video(r["path"])
        videos.append(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in frames]))
        captions.append(r["caption"])
        movers.append(m)
    if not videos:
        raise ValueError(f"--data {world}: no {split} videos{' with one mover' if single else ''} in t2x_video.json")
    return videos, captions, movers


def direction_accuracy(videos, directions: list[str]) -> float:
    """Share of ``videos`` whose :func:`motion_direction` is the requested one."""
    return float(np.mean([motion_direction(v) == d for v, d in zip(videos, directions, strict=True)]))


def frame_top1(clip, videos, labels: list[int], classes: list[str]) -> float:
    """The CLIP's zero-shot top-1 of every frame against its video's label, averaged over all frames."""
    from mmfast.eval.t2i import clip_image_features
    from mmfast.eval.zeroshot import SINGLE_TEMPLATE, zeroshot_classifier

    w = zeroshot_classifier(clip, classes, [SINGLE_TEMPLATE])
    hits = []
    for v, y in zip(videos, labels, strict=True):
        pred = (clip_image_features(clip, torch.as_tensor(v)) @ w).argmax(1)
        hits.append((pred == y).double().mean())
    return float(torch.stack(hits).mean())


__all__ = ["direction_accuracy", "frame_top1", "load_videos", "motion_direction", "parse_caption"]

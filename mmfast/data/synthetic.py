"""A deterministic synthetic multimodal world written in real dataset formats.

Sixteen icon classes (``_draw.CLASSES``) in ten colours are placed 1-5 per image on varied
backgrounds. Class frequencies follow a Zipf prior over the category-id order, and each image belongs
to a *theme* (sky, street, garden, table, pond) whose classes it draws more often, so objects co-occur
the way COCO's do: POPE's popular (frequent) and adversarial (co-occurring) negatives are harder than
random ones. Every image has one main object, clearly the largest, whose class is its label for
zero-shot classification. Every object sits on a 4x4 grid, the tiny CLIP's 8-px patches (``GRID``): a
small one centred in one cell, the main one in a 2x2 block.

Same seed -> byte-identical files: each image draws from its own generator seeded by
``(seed, index)``, and every writer emits a fixed order.

    mmfast data synth --out DIR --images 2000 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmfast.data import _draw, _text
from mmfast.data._world import (  # noqa: F401  (the world's classes and priors; re-exported)
    CLASSES,
    THEME_NAMES,
    THEME_P,
    THEMES,
    ZIPF_EXPONENT,
    _theme_weights,
    class_prior,
    zipf_prior,
)
from mmfast.utils.io import atomic_open, atomic_write_json

SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges keep small icons recognisable
N_OBJECTS_P = np.array([0.15, 0.2, 0.25, 0.2, 0.2])  # P(1..5 objects)
MAIN_SCALE = (0.44, 0.5)  # side of the main object / image side: it fills a 2x2 block of the grid
OTHER_SCALE = (0.18, 0.3)  # side of each other object / image side: about one cell (5.8-9.6 px in 8)
# A ViT this small does not learn translation-invariant recognition in a CPU-minutes budget; on the grid each
# small object is one patch token and the main one four, always in the same place within them. Measured on
# held-out images after 600 steps (batch 128) of direct supervision of the tiny tower (8-px patches):
# main-object accuracy / object-presence AUC 0.83 / 0.93 with the main object anywhere, 0.998 / 0.99 with
# it on the grid. The demo's CLIP (2026-11-27): zero-shot top-1 0.59 -> 0.997, and an MLP probe of its
# frozen patches, presence AUC 0.93 -> 0.96 (before: small objects on an 8x8 grid of 4-px patches); 0.99 with
# captions that name every object (``_text.MAIN_CAPTION_P``).
GRID = 4


def _bg_word(rgb) -> str:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "dark" if lum < 90 else ("light" if lum > 185 else "grey")


def _pick_color(rng: np.random.Generator, cls: str, bg) -> str:
    names = list(_draw.COLORS)
    typical = _draw.TYPICAL_COLORS.get(cls)
    for _ in range(20):
        if typical and rng.random() < 0.5:
            name = typical[int(rng.integers(len(typical)))]
        else:
            name = names[int(rng.integers(len(names)))]
        if _draw.color_distance(_draw.COLORS[name], bg) >= 110:
            return name
    # Fall back to whichever colour stands out most from this background.
    return max(names, key=lambda n: _draw.color_distance(_draw.COLORS[n], bg))


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area; boxes are (x, y, w, h)."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(1e-6, min(a[2] * a[3], b[2] * b[3]))


def _on_grid(cell_index: int, extent: float, size: int, span: int) -> float:
    """Start of an object of ``extent`` centred in the ``span``-cell block at ``cell_index`` of the grid."""
    cell = size / GRID
    return min(max(cell_index * cell + (span * cell - extent) / 2, 0.0), size - extent)


def sample_scene(seed: int, index: int, size: int) -> tuple[dict, Image.Image]:
    """One image and its scene record. Depends only on (seed, index, size)."""
    rng = np.random.default_rng([seed, index])
    theme = THEME_NAMES[int(rng.integers(len(THEME_NAMES)))]
    bases = THEMES[theme][1] if rng.random() < 0.7 else [b for t in THEMES.values() for b in t[1]]
    bg = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in bases[int(rng.integers(len(bases)))])
    n = int(rng.choice(5, p=N_OBJECTS_P)) + 1
    tw, gw = _theme_weights(theme), zipf_prior()

    canvas = size * SUPERSAMPLE
    img = _draw.background(rng, size, bg, scale=SUPERSAMPLE)
    placed: list[tuple[float, float, float, float]] = []
    objects = []
    for k in range(n):
        cls = CLASSES[int(rng.choice(len(CLASSES), p=tw if rng.random() < THEME_P else gw))]
        # The main object is clearly the largest; the rest are small enough to fit around it.
        s = size * rng.uniform(*(MAIN_SCALE if k == 0 else OTHER_SCALE))
        asp = _draw.ASPECT.get(cls, 1.0)
        w, h = (s, s / asp) if asp >= 1 else (s * asp, s)
        box = None
        span = 2 if k == 0 else 1
        for _ in range(30):
            gx, gy = (int(v) for v in rng.integers(0, GRID - span + 1, size=2))
            x, y = _on_grid(gx, w, size, span), _on_grid(gy, h, size, span)
            if all(_overlap((x, y, w, h), p) <= 0.2 for p in placed):
                box = (x, y, w, h)
                break
        if box is None:
            continue
        color = _pick_color(rng, cls, bg)
        # A thin main object (moon, cross) can cover less than a small solid one; keep the main one largest
        # by drawing the small one smaller (not below OTHER_SCALE), in the same cell. Dropping it instead
        # thinned out the themes' co-occurrences (the sky theme's lift fell below 1.5).
        res = None
        cx, cy = box[0] + w / 2, box[1] + h / 2
        for shrink in (1.0, 0.85, 0.7):
            if shrink < 1.0 and max(w, h) * shrink < OTHER_SCALE[0] * size:
                break
            bw, bh = w * shrink, h * shrink
            x, y = (cx - bw / 2) * SUPERSAMPLE, (cy - bh / 2) * SUPERSAMPLE
            res = _draw.shape(cls, canvas, (x, y, x + bw * SUPERSAMPLE, y + bh * SUPERSAMPLE))
            if res is not None and objects and res[2] >= 0.7 * objects[0]["area"] * SUPERSAMPLE**2:
                res = None
                continue
            break
        if res is None:
            continue
        mask, (x0, y0, x1, y1), area = res
        img.paste(_draw.COLORS[color], (0, 0), mask)
        placed.append(box)
        f = float(SUPERSAMPLE)
        objects.append(
            {
                "cls": cls,
                "color": color,
                "bbox": [
                    round(x0 / f, 2),
                    round(y0 / f, 2),
                    round((x1 - x0) / f, 2),
                    round((y1 - y0) / f, 2),
                ],
                "area": round(area / f**2, 2),
            }
        )
    if SUPERSAMPLE > 1:
        img = img.resize((size, size), Image.BOX)
    return {"objects": objects, "bg": _bg_word(bg), "theme": theme, "size": size}, img


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _render(args: tuple[int, int, int, int]) -> list[tuple[dict, bytes]]:
    """Scenes and PNG bytes of images ``start..stop-1`` (a worker's chunk)."""
    seed, start, stop, size = args
    out = []
    for i in range(start, stop):
        scene, img = sample_scene(seed, i, size)
        out.append((scene, _png_bytes(img)))
    return out


def _render_all(seed: int, n: int, size: int, workers: int):
    """Yield ``(index, scene, png)`` in index order; each image depends only on (seed, index), so the
    bytes are the same for any number of workers."""
    chunk = max(1, min(50, -(-n // (4 * max(workers, 1)))))  # a few chunks per worker, at most 50 images
    jobs = [(seed, s, min(s + chunk, n), size) for s in range(0, n, chunk)]
    if workers <= 1 or len(jobs) <= 1:
        results = map(_render, jobs)
        pool = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the parent may hold torch/OpenMP threads that fork would copy in a bad state.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_render, jobs)
    try:
        for (_, start, _, _), chunk_out in zip(jobs, results):
            for k, (scene, png) in enumerate(chunk_out):
                yield start + k, scene, png
    finally:
        if pool is not None:
            pool.shutdown()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _coco(split_scenes: list[tuple[int, str, dict]], size: int) -> dict:
    images, anns = [], []
    for image_id, rel, scene in split_scenes:
        images.append({"id": image_id, "file_name": rel, "width": size, "height": size})
        for k, o in enumerate(scene["objects"]):
            # Unique across splits: an image holds at most 5 objects.
            anns.append(
                {
                    "id": image_id * 10 + k,
                    "image_id": image_id,
                    "category_id": CLASSES.index(o["cls"]) + 1,
                    "bbox": o["bbox"],
                    "area": o["area"],
                    "iscrowd": 0,
                    "attributes": {"color": o["color"]},
                }
            )
    cats = [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(CLASSES)]
    info = {"description": "mmfast synthetic world", "version": "1.0"}
    return {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def make_world(
    out_dir,
    n_images: int = 2000,
    image_size: int = 64,
    seed: int = 0,
    *,
    val_fraction: float = 0.2,
    captions_per_image: int = 2,
    media: bool = True,
    n_videos: int | None = None,
    audio_per_class: int = 4,
    video_frames: int = 8,
    shard_size: int = 0,
    workers: int | None = None,
    overwrite: bool = True,
) -> dict:
    """Write the world to ``out_dir`` and return a summary (counts, paths, seconds taken).

    Media paths in every file are relative to ``out_dir``. ``media=False`` skips audio, video and the
    text->media pairs (the image-side files are the same either way). ``shard_size > 0`` also packs
    each caption CSV into webdataset shards ``shards/{split}-NNNNNN.tar`` of that many samples.
    Writing over an older world leaves its extra files (say, images past the new count) in place;
    no index file refers to them. ``workers`` processes draw the images (default: up to 2 for
    worlds of 400+ images); the output does not depend on it.
    """
    if n_images < 2:
        raise ValueError(f"n_images must be >= 2 (one train and one val image), got {n_images}")
    if audio_per_class < 1:
        raise ValueError(f"audio_per_class must be >= 1, got {audio_per_class}")
    if n_videos is not None and n_videos < 1:
        raise ValueError(f"n_videos (--videos) must be >= 1, got {n_videos}")
    if video_frames < 2:
        raise ValueError(f"video_frames (--video-frames) must be >= 2 (a video moves), got {video_frames}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 so the icons stay recognisable, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {out} is not empty; pass overwrite=True (--force) to write over it"
        )
    t0 = time.perf_counter()
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_val = min(n_images - 1, max(1, round(n_images * val_fraction)))
    n_train = n_images - n_val

    from mmfast.data import _worldfiles  # the text-heavy writers live beside this module

    splits: dict[str, list[tuple[int, str, dict]]] = {"train": [], "val": []}
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n_images >= 400 else 1
    for i, scene, png in _render_all(seed, n_images, image_size, workers):
        split, j = ("train", i) if i < n_train else ("val", i - n_train)
        rel = f"images/{split}_{j:06d}.png"
        (out / rel).write_bytes(png)
        splits[split].append((i + 1, rel, scene))

    atomic_write_json(out / "classes.json", CLASSES)
    for split, items in splits.items():
        atomic_write_json(
            out / "annotations" / f"instances_{split}.json", _coco(items, image_size), indent=None
        )
        rows = []
        for image_id, rel, scene in items:
            rng = np.random.default_rng([seed, image_id, 1])
            rows += [[rel, c] for c in _text.captions(scene, rng, captions_per_image)]
        _write_csv(out / f"captions_{split}.csv", ["filepath", "caption"], rows)
        _write_csv(
            out / f"zeroshot_{split}.csv",
            ["filepath", "label", "class"],
            [[rel, CLASSES.index(s["objects"][0]["cls"]), s["objects"][0]["cls"]] for _, rel, s in items],
        )
        objs = [
            {"image": rel, "objects": list(dict.fromkeys(o["cls"] for o in s["objects"]))}
            for _, rel, s in items
        ]
        _write_jsonl(out / f"objects_{split}.jsonl", objs)
        _worldfiles.write_llava(out, split, items, seed)
    summary = {"out_dir": str(out), "n_train": n_train, "n_val": n_val, "classes": len(CLASSES)}
    if media:
        summary.update(
            _worldfiles.write_media(
                out,
                splits,
                seed,
                image_size,
                n_videos=n_videos,
                audio_per_class=audio_per_class,
                video_frames=video_frames,
            )
        )
    if shard_size > 0:
        from mmfast.data.webdataset import csv_to_shards

        for split in splits:
            paths = csv_to_shards(
                out / f"captions_{split}.csv", out / "shards", maxcount=shard_size, prefix=split
            )
            summary[f"shards_{split}"] = len(paths)
    _worldfiles.write_readme(out, summary, seed, image_size)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmfast data synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=2000, help="number of images (train + val)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--captions-per-image", type=int, default=2)
    p.add_argument("--no-media", action="store_true", help="skip audio, video and text->media pairs")
    p.add_argument("--audio-per-class", type=int, default=4,
                   help="audio clips per class (the last of each class is the val clip)")
    p.add_argument("--videos", type=int, default=None,
                   help="videos (train + val; default max(8, images / 20))")
    p.add_argument("--video-frames", type=int, default=8, help="frames per video")
    p.add_argument(
        "--shard-size", type=int, default=0, help="also write webdataset shards of this many samples"
    )
    p.add_argument("--workers", type=int, default=None, help="processes drawing images (default: up to 2)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    a = p.parse_args(argv)
    try:
        s = make_world(
            a.out,
            a.images,
            a.size,
            a.seed,
            val_fraction=a.val_fraction,
            captions_per_image=a.captions_per_image,
            media=not a.no_media,
            audio_per_class=a.audio_per_class,
            n_videos=a.videos,
            video_frames=a.video_frames,
            shard_size=a.shard_size,
            workers=a.workers,
            overwrite=a.force,
        )
    except (ValueError, FileExistsError) as e:
        print(f"mmfast data synth: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s))
    return 0

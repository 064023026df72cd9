"""Ship a trained image, audio or video decoder into the package (``make decoders``' last step; see
:mod:`mmfast.models.nextgpt.shipped`).

    python -m mmfast.training.ship_decoder --from runs/decoders/unet/final/pipeline --world runs/decoders/world \
        [--clip runs/demo/clip/final] [--train-summary RUN/train_summary.json ...]
    python -m mmfast.training.ship_decoder --modality audio --from runs/decoders/audio_unet/final/pipeline \
        --world runs/decoders/world_audio [--train-summary ...]
    python -m mmfast.training.ship_decoder --modality video --from runs/decoders/video_unet/final/pipeline \
        --world runs/decoders/world_video [--train-summary ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import torch

from mmfast.models.nextgpt.decoders import WEIGHTS
from mmfast.models.nextgpt.shipped import HELDOUT, heldout_denoise_loss, heldout_rows, read_pipeline


def _heldout(world: Path, modality: str) -> list[tuple[str, str, int]]:
    """``[(path inside world, prompt, label)]``: the first validation images, one prompt each, as ``mmfast eval
    t2i`` picks them, every validation clip (one per class), or the first validation videos with one mover."""
    if modality == "image":
        from mmfast.eval.t2i import heldout_prompts

        return heldout_prompts(world, HELDOUT)
    from mmfast.data.media import world_t2x

    if modality == "video":
        from mmfast.eval.t2v import parse_caption

        records, classes = world_t2x(world, "video", "val")
        rows = [(r["video_name"], r["caption"], parse_caption(r["caption"], classes)) for r in records]
        return [(path, cap, classes.index(m[0][0])) for path, cap, m in rows if len(m) == 1][:HELDOUT]

    records, classes = world_t2x(world, "audio", "val")
    index = {c: i for i, c in enumerate(classes)}
    return [(r["audio_name"], r["caption"], index[r["id"].rsplit("_", 1)[0]]) for r in records]


def ship(src: str | Path, dest: str | Path, world: str | Path, clip: str | Path | None = None,
         train: dict | None = None, eval_prompts: int = 200, modality: str = "image") -> dict:
    """Copy the trained pipeline ``src`` to ``dest`` in fp16 with ``heldout/`` (:func:`_heldout`) and
    ``RECORD.json``. The record holds the shipped (fp16) weights' figures: for images ``mmfast eval t2i``'s with
    ``clip`` (the demo's CLIP), for audio ``mmfast eval t2a``'s, for video ``mmfast eval t2v``'s."""
    from mmfast.utils.io import atomic_write_json, safe_join

    src, dest, world = Path(src), Path(dest), Path(world)
    tmp = dest.with_name(f".{dest.name}.incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    read_pipeline(src, torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    # diffusers records the folder it read from: drop it, so the shipped files do not depend on where they were made
    for f in [tmp / "model_index.json", *tmp.glob("*/config.json")]:
        cfg = json.loads(f.read_text(encoding="utf-8"))
        if cfg.pop("_name_or_path", None) is not None:
            atomic_write_json(f, cfg, indent=2)
    (tmp / "heldout").mkdir()
    rows = _heldout(world, modality)
    with open(tmp / "heldout" / "prompts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "label"])
        for path, cap, label in rows:
            shutil.copyfile(safe_join(world, path), tmp / "heldout" / Path(path).name)
            w.writerow([Path(path).name, cap, label])
    rec = {"modality": modality, "source": str(src), "world": str(world), "train": train or {},
           "heldout_denoise_loss": heldout_denoise_loss(read_pipeline(tmp), heldout_rows(tmp)),
           "heldout_denoise_loss_unrounded": heldout_denoise_loss(read_pipeline(src), heldout_rows(tmp))}
    if modality == "audio":
        from mmfast.eval.t2a import evaluate as t2a

        rec["t2a"] = {str(g): t2a(str(tmp), world, guidance_scale=g) for g in (3.0, 5.0)}
    elif modality == "video":
        from mmfast.eval.t2v import FrameJudge
        from mmfast.eval.t2v import evaluate as t2v

        judge = FrameJudge.fit(world)
        rec["t2v"] = {str(g): t2v(str(tmp), world, guidance_scale=g, frame_judge=judge) for g in (3.0, 5.0)}
    elif clip is not None:
        from mmfast.eval.t2i import evaluate

        rec["t2i"] = {str(g): evaluate(tmp, clip, world, n=eval_prompts, guidance_scale=g) for g in (3.0, 5.0)}
    atomic_write_json(tmp / "RECORD.json", rec)
    old = dest.with_name(f".{dest.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfast.training.ship_decoder", description=ship.__doc__)
    p.add_argument("--modality", default="image", choices=("image", "audio", "video"))
    p.add_argument("--from", dest="src", required=True, help="the UNet stage's RUN/final/pipeline")
    p.add_argument("--world", required=True, help="the world it trained on (its val split is held out)")
    p.add_argument("--clip", default=None, help="the demo's CLIP (RUN/clip/final), for the t2i figures")
    p.add_argument("--dest", default=None, help="default: the package's weights/<modality>")
    p.add_argument("--train-summary", nargs="*", default=[], help="train_summary.json files to record")
    a = p.parse_args(argv)
    keep = ("stage", "steps", "world_size", "zero_stage", "train_seconds", "scaling_factor", "snr_gamma",
            "text_encoder", "frames", "image_decoder", "prediction_type")
    train = {}
    for s in a.train_summary:
        summary = json.loads(Path(s).read_text(encoding="utf-8"))
        train[summary.get("stage", Path(s).parent.name)] = {k: summary[k] for k in keep if k in summary}
    rec = ship(a.src, a.dest or WEIGHTS / a.modality, a.world, a.clip, train, modality=a.modality)
    print(json.dumps({k: v for k, v in rec.items() if k != "train"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

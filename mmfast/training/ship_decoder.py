"""Ship a trained image decoder into the package (``make decoders``' last step; see
:mod:`mmfast.models.nextgpt.shipped`).

    python -m mmfast.training.ship_decoder --from runs/decoders/unet/final/pipeline --world runs/decoders/world \
        [--clip runs/demo/clip/final] [--train-summary RUN/train_summary.json ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import torch

from mmfast.models.nextgpt.shipped import HELDOUT, WEIGHTS, heldout_denoise_loss, heldout_rows, read_pipeline


def ship(src: str | Path, dest: str | Path, world: str | Path, clip: str | Path | None = None,
         train: dict | None = None, eval_prompts: int = 200) -> dict:
    """Copy the trained pipeline ``src`` to ``dest`` in fp16 with ``heldout/`` (the world's first validation
    images, one prompt each, as ``mmfast eval t2i`` picks them) and ``RECORD.json``. With ``clip`` (the demo's
    CLIP), the record holds ``mmfast eval t2i``'s figures for the shipped (fp16) weights too."""
    from mmfast.eval.t2i import heldout_prompts
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
    rows = heldout_prompts(world, HELDOUT)
    with open(tmp / "heldout" / "prompts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "label"])
        for path, cap, label in rows:
            shutil.copyfile(safe_join(world, path), tmp / "heldout" / Path(path).name)
            w.writerow([Path(path).name, cap, label])
    rec = {"modality": "image", "source": str(src), "world": str(world), "train": train or {},
           "heldout_denoise_loss": heldout_denoise_loss(read_pipeline(tmp), heldout_rows(tmp)),
           "heldout_denoise_loss_unrounded": heldout_denoise_loss(read_pipeline(src), heldout_rows(tmp))}
    if clip is not None:
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
    p.add_argument("--from", dest="src", required=True, help="the UNet stage's RUN/final/pipeline")
    p.add_argument("--world", required=True, help="the world it trained on (its val split is held out)")
    p.add_argument("--clip", default=None, help="the demo's CLIP (RUN/clip/final), for the t2i figures")
    p.add_argument("--dest", default=str(WEIGHTS / "image"))
    p.add_argument("--train-summary", nargs="*", default=[], help="train_summary.json files to record")
    a = p.parse_args(argv)
    keep = ("stage", "steps", "world_size", "zero_stage", "train_seconds", "scaling_factor", "snr_gamma", "text_encoder")
    train = {}
    for s in a.train_summary:
        summary = json.loads(Path(s).read_text(encoding="utf-8"))
        train[summary.get("stage", Path(s).parent.name)] = {k: summary[k] for k in keep if k in summary}
    rec = ship(a.src, a.dest, a.world, a.clip, train)
    print(json.dumps({k: v for k, v in rec.items() if k != "train"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

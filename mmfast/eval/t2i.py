"""Text-to-image accuracy of a decoder on HELD-OUT world captions, judged by a CLIP zero-shot classifier.

    mmfast eval t2i --pipeline runs/dec/final/pipeline --clip runs/demo/clip/final --data WORLD [--n 200]

For ``--n`` validation images of the world (never seen by ``mmfast train decoder``, which reads
``captions_train.csv`` only), the first caption that names the image's main object (its zero-shot label) is
the prompt. Each generated image is classified by the CLIP's zero-shot head over the world's classes
(``single`` template: "a photo of a {}."):

* ``t2i_top1``: share of generated images whose predicted class is the requested main object
  (16 classes: chance 1/16 = 0.06);
* ``clipsim_margin``: CLIPSIM (cosine of image and caption embeddings) with its own caption minus the mean
  with the other prompts' captions;
* ``real_top1`` / ``real_clipsim_margin``: the same on the real validation images of those prompts: the
  ceiling this CLIP can report.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from mmfast.utils.io import atomic_write_json, safe_join


def heldout_prompts(world: str | Path, n: int, split: str = "val") -> list[tuple[str, str, int]]:
    """``[(image path, caption, label)]``: per image of ``split``, its first caption naming its main object."""
    root = Path(world)
    classes = json.loads((root / "classes.json").read_text(encoding="utf-8"))
    for name in (f"zeroshot_{split}.csv", f"captions_{split}.csv"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"--data {root}: no {name} (a synthetic world made by `mmfast data synth`)")
    with open(root / f"zeroshot_{split}.csv", encoding="utf-8", newline="") as f:
        label = {r["filepath"]: int(r["label"]) for r in csv.DictReader(f)}
    out, seen = [], set()
    with open(root / f"captions_{split}.csv", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            path, cap = r["filepath"], r["caption"]
            if path in seen or path not in label or classes[label[path]] not in cap.split():
                continue
            seen.add(path)
            out.append((path, cap, label[path]))
            if len(out) == n:
                break
    if not out:
        raise ValueError(f"--data {root}: no {split} caption names its image's main object")
    return out


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance_scale: float = 3.0,
             batch_size: int = 50) -> torch.Tensor:
    """(N, H, W, 3) float images in [0, 1]; batch b draws from a generator seeded ``seed + b``, so an image
    depends on its batch, the seed and the sampler settings only."""
    out = []
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[i:i + batch_size]
        gen = torch.Generator(device="cpu").manual_seed(seed + b)
        imgs = pipe(prompt=chunk, negative_prompt=[""] * len(chunk), num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=gen, output_type="np").images
        out.append(torch.from_numpy(imgs))
    return torch.cat(out)


@torch.no_grad()
def clip_image_features(model, images) -> torch.Tensor:
    """Normalised CLIP embeddings of PIL images or (N, H, W, 3) [0, 1] arrays, with the eval transform."""
    from PIL import Image

    from mmfast.models.clip.model import get_transforms

    tf = get_transforms(model, is_train=False)
    if isinstance(images, torch.Tensor):
        images = [Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()) for x in images]
    x = torch.stack([tf(im.convert("RGB")) for im in images])
    return model.encode_image(x, normalize=True).float()


@torch.no_grad()
def clip_text_features(model, texts: list[str]) -> torch.Tensor:
    from mmfast.models.clip.encode import encode_texts

    return encode_texts(model, list(texts)).float()


def scores(img: torch.Tensor, caps: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> dict:
    """top-1 against ``labels`` and the matched-minus-mismatched CLIPSIM margin."""
    top1 = float(((img @ classifier).argmax(1) == labels).float().mean())
    sim = img @ caps.T  # (N, N)
    n = sim.shape[0]
    matched = float(sim.diag().mean())
    mismatched = float((sim.sum() - sim.diag().sum()) / max(1, n * n - n))
    return {"top1": top1, "clipsim": matched, "clipsim_mismatched": mismatched, "margin": matched - mismatched}


def evaluate(pipeline: str | Path, clip: str | Path, world: str | Path, n: int = 200, seed: int = 0,
             steps: int = 25, guidance_scale: float = 3.0, save_grid: str | Path | None = None) -> dict:
    from PIL import Image

    from mmfast.eval.zeroshot import SINGLE_TEMPLATE, zeroshot_classifier
    from mmfast.models.clip.model import create_model
    from mmfast.models.nextgpt.shipped import read_pipeline

    for what, p in (("--pipeline", pipeline), ("--clip", clip), ("--data", world)):
        if not Path(p).is_dir():
            raise FileNotFoundError(f"{what} {p}: no such folder")
    rows = heldout_prompts(world, n)
    classes = json.loads((Path(world) / "classes.json").read_text(encoding="utf-8"))
    pipe = read_pipeline(pipeline)
    model = create_model(None, pretrained=str(clip), device="cpu", kernels=False).eval()
    labels = torch.tensor([r[2] for r in rows])
    t0 = time.perf_counter()
    gen = generate(pipe, [r[1] for r in rows], seed, steps, guidance_scale)
    gen_s = time.perf_counter() - t0
    w = zeroshot_classifier(model, classes, [SINGLE_TEMPLATE])
    caps = clip_text_features(model, [r[1] for r in rows])
    fake = scores(clip_image_features(model, gen), caps, w, labels)
    real_imgs = [Image.open(safe_join(Path(world), r[0])) for r in rows]
    real = scores(clip_image_features(model, real_imgs), caps, w, labels)
    if save_grid:
        k = min(len(rows), 32)
        grid = torch.cat([torch.cat(list(gen[i:i + 8]), 1) for i in range(0, k - k % 8, 8)], 0)
        Image.fromarray((grid * 255).round().to(torch.uint8).numpy()).save(save_grid)
    return {"t2i_top1": fake["top1"], "clipsim_margin": fake["margin"], "clipsim": fake["clipsim"],
            "real_top1": real["top1"], "real_clipsim_margin": real["margin"], "n": len(rows), "classes": len(classes),
            "chance": 1.0 / len(classes), "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
            "generate_seconds": round(gen_s, 1), "resolution": list(gen.shape[1:3])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmfast eval t2i", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (RUN/final/pipeline)")
    p.add_argument("--clip", required=True, help="a CLIP export (the demo's RUN/clip/final)")
    p.add_argument("--data", required=True, help="the synthetic world (its val split is held out)")
    p.add_argument("--n", type=int, default=200, help="held-out prompts (one per val image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--save-grid", default=None, help="PNG of the first 32 generated images")
    p.add_argument("--out", default=None, help="write the result JSON here too")
    a = p.parse_args(argv)
    if a.n < 2:
        p.error(f"--n {a.n}: need at least 2 prompts (the margin compares mismatched pairs)")
    if a.steps < 1:
        p.error(f"--steps {a.steps}: must be >= 1")
    try:
        res = evaluate(a.pipeline, a.clip, a.data, a.n, a.seed, a.steps, a.guidance_scale, a.save_grid)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmfast eval t2i: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if a.out:
        atomic_write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

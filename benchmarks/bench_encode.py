"""CLIP embedding throughput, mmfast vs open_clip: images/s and texts/s, peak memory, side by side in one
process on the same weights.

One step encodes ``--n`` images (mode ``images``) or texts (mode ``texts``) in batches of ``--batch``
(images) / ``--text-batch`` (texts), L2-normalised, under ``torch.inference_mode``. Providers:

* ``open_clip``: ``create_model(..., kernels=False)`` (open_clip's own modules), a loop of
  ``model.encode_image(x, normalize=True)`` / ``encode_text`` over the batches; bf16 autocast on CUDA;
* ``mmfast``: ``create_model(..., kernels=True)`` through :func:`mmfast.models.clip.encode.encode_images` /
  ``encode_texts`` as users call them (``kernels="auto"``: ``mmfast.patch``'s rules — mmfast attention,
  LayerNorm, fused projection + L2 norm — on CUDA; on CPU the call runs without them, measured faster
  there); bf16 autocast on CUDA, fp32 on CPU;
* ``mmfast-kernels``: the same with ``kernels=True`` (the patched modules on CPU too).

Shapes: CPU default the ``tiny`` preset (32 px, 4 layers), 1024 images in batches of 256, 1024 texts in
batches of 256, fp32; GPU default ViT-B-16 (224 px), 8192 images in batches of 1024, 8192 texts in
batches of 256, bf16.

    python benchmarks/bench_encode.py --cpu --threads 1 --rounds 2
    python benchmarks/bench_encode.py --gpu --model ViT-B-16

Rows go to ``benchmarks/results/encode_<device>.csv``; the summary prints images/s, texts/s and each
provider's ratio to open_clip.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmfast.bench import harness

PROVIDERS = ("open_clip", "mmfast", "mmfast-kernels")


def _setup(name: str):
    def setup(case: dict, mode: str):
        from mmfast.models.clip import create_model, get_tokenizer
        from mmfast.models.clip.encode import encode_images, encode_texts

        device, n = case["device"], case["n"]
        torch.manual_seed(0)
        model = create_model(case["model"], device=device, kernels=name != "open_clip").eval()
        size = model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        gen = torch.Generator().manual_seed(0)
        if mode == "images":
            data = torch.randn(n, 3, *size, generator=gen).to(device)
            bs = case["batch"]
        else:
            data = get_tokenizer(model)([f"a photo of {i % 97} red stars next to a small blue car" for i in range(n)])
            data = data.to(device)
            bs = case["text_batch"]
        if name == "open_clip":
            encode = model.encode_image if mode == "images" else model.encode_text
            amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

            def step():
                with torch.inference_mode(), amp:
                    return torch.cat([encode(data[i: i + bs], normalize=True).float()
                                      for i in range(0, n, bs)])
        else:
            fn = encode_images if mode == "images" else encode_texts
            kernels = True if name == "mmfast-kernels" else "auto"

            def step():
                return fn(model, data, batch_size=bs, progress=False, kernels=kernels)

        return step

    return setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_encode", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, "encode")
    p.add_argument("--model", help="CLIP preset or open_clip architecture (CPU default tiny, GPU ViT-B-16)")
    p.add_argument("--n", type=int, help="images / texts per step (CPU default 1024, GPU 8192)")
    p.add_argument("--batch", type=int, help="image batch (CPU default 256, GPU 1024)")
    p.add_argument("--text-batch", type=int, default=256)
    return harness.add_rounds_args(p)


def main(argv: list[str] | None = None) -> int:
    parsed = harness.parse_rounds(_parser(), argv, PROVIDERS)
    if parsed is None:
        return 2
    a, device, names = parsed
    gpu = device == "cuda"
    case = {"model": a.model or ("ViT-B-16" if gpu else "tiny"), "n": a.n or (8192 if gpu else 1024),
            "batch": a.batch or (1024 if gpu else 256), "text_batch": a.text_batch, "device": device,
            "threads": torch.get_num_threads()}
    out = harness.results_csv(a, "encode", device, Path(__file__).resolve().parent / "results")
    rows = harness.run_rounds("encode", names, _setup, case, x_key="n", device=device, modes=("images", "texts"),
                              args=a, out=out)
    by = harness.best_of_rounds(rows)  # each provider's best round
    print(f"\n{case['model']}, {case['n']} per step, image batch {case['batch']}, text batch {case['text_batch']}, "
          f"{device}, {torch.get_num_threads()} threads")
    for n in names:
        parts = []
        for mode in ("images", "texts"):
            r, base = by.get((n, mode)), by.get(("open_clip", mode))
            if r is None or r.error:
                parts.append(f"{mode}: {r.error if r else 'not run'}")
                continue
            ratio = "" if base is None or base.error else f" ({base.median_ms / r.median_ms:.2f}x open_clip)"
            parts.append(f"{case['n'] / (r.median_ms / 1e3):9.0f} {mode}/s{ratio}, peak {r.peak_mem_mib:.0f} MiB")
        print(f"  {n:<18} " + "  |  ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

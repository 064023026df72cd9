"""CLIP embeddings at throughput: images (a tensor, files, or a folder) and texts in batches.

    from mmfast.models.clip import create_model
    from mmfast.models.clip.encode import encode_images, encode_texts
    model = create_model("ViT-B-16", pretrained=DIR)          # mmfast.patch'ed (kernels=True)
    img = encode_images(model, "photos/", batch_size=1024)     # (N, E) fp32, L2-normalised
    txt = encode_texts(model, ["a photo of a cat", ...], batch_size=256)

Each batch runs under ``torch.inference_mode``; on CUDA under bf16 autocast (``dtype=`` to choose), on
CPU in the model's dtype (fp32). A tqdm bar shows the progress and the rate; the rate of the whole call
(images/s, texts/s) is logged at INFO level and kept in :data:`LAST_RATE`.

Kernels (``kernels=``): a model built with ``create_model(kernels=True)`` carries ``mmfast.patch``'s rules
(mmfast attention, LayerNorm, fused projection + L2 norm). ``"auto"`` (default) runs them on CUDA and,
on CPU, runs the call with the rules taken off and put back afterwards, because there they were measured
slower (tiny preset, 1024 images / texts, batch 256, 1 thread, the two alternated 6 times in one process,
best run: 1784 vs 1342 images/s, 1896 vs 1465 texts/s; docs/inference.md); the choice is logged.
``True``: the model as built; ``False``: always without the rules.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LAST_RATE: dict = {}  # {"images/s": ..., "texts/s": ...} of the last call of each


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"images={str(folder)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"images={str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _device_dtype(model, device, dtype):
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else p.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return device, dtype


@contextlib.contextmanager
def _kernels(model, kernels, device):
    """The model with mmfast's patch rules on or off for the call (see the module docstring)."""
    from mmfast.models import patch as patch_mod

    if kernels not in ("auto", True, False):
        raise ValueError(f"kernels must be 'auto', True or False, got {kernels!r}")
    rules = patch_mod.patched_rules(model)
    off = bool(rules) and (kernels is False or (kernels == "auto" and device.type == "cpu"))
    if not off:
        yield
        return
    if kernels == "auto":
        log.info("CPU: encoding without mmfast's patch rules %s (measured faster on CPU; kernels=True keeps them)",
                 rules)
    kinds = {r.name: r.kind for r in patch_mod.all_rules()}
    backend = patch_mod.backend_of(model)
    patch_mod.unpatch(model)
    try:
        yield
    finally:
        patch_mod.patch(model, tuple(dict.fromkeys(kinds[r] for r in rules if r in kinds)), backend=backend)
        if patch_mod.patched_rules(model) != rules:
            raise RuntimeError(f"re-patching after the encode gave rules {patch_mod.patched_rules(model)}, "
                               f"not the model's {rules}")


def _autocast(device, dtype, model_dtype):
    if dtype == model_dtype:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _run(encode, batches, n: int, unit: str, device, dtype, model_dtype, normalize: bool, progress: bool):
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(total=n, unit=unit[:-2], disable=not progress, desc=f"encode {unit[:-2]}s")
    start = time.perf_counter()
    with torch.inference_mode(), _autocast(device, dtype, model_dtype):
        for batch in batches:
            x = batch.to(device, non_blocking=True)
            if x.is_floating_point():
                x = x.to(model_dtype if dtype == model_dtype else x.dtype)
            out.append(encode(x, normalize=normalize).float())
            bar.update(x.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    rate = n / seconds if seconds > 0 else float("inf")
    LAST_RATE[unit] = rate
    log.info("encoded %d %ss in %.2f s: %.1f %s", n, unit[:-2], seconds, rate, unit)
    return torch.cat(out) if out else torch.empty(0)


def _image_batches(model, images, batch_size: int, num_workers: int):
    """Batches of preprocessed images and their count, from a tensor, a folder or a list of files / PIL images."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
        return (images[i: i + batch_size] for i in range(0, images.shape[0], batch_size)), images.shape[0]
    if isinstance(images, (str, os.PathLike)):
        images = list_images(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a tensor, a folder or a list of files / PIL images, got {type(images).__name__}")
    from mmfast.models.clip.model import get_transforms
    from mmfast.utils.io import open_image

    tf = get_transforms(model, is_train=False)

    class _Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            x = images[i]
            return tf(open_image(x) if isinstance(x, (str, os.PathLike)) else x)

    loader = torch.utils.data.DataLoader(_Files(), batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available())
    return iter(loader), len(images)


def encode_images(model, images, *, batch_size: int = 256, normalize: bool = True, device=None, dtype=None,
                  num_workers: int = 0, progress: bool = True, kernels="auto") -> torch.Tensor:
    """(N, E) fp32 image embeddings of an open_clip-style model (``encode_image(x, normalize=)``).

    ``images``: a preprocessed (N, 3, H, W) tensor, a folder (every image under it, sorted; see
    :func:`list_images`) or a list of files / PIL images (the model's eval transform applies;
    ``num_workers`` DataLoader processes decode them). ``kernels``: see the module docstring."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = _device_dtype(model, device, dtype)
    batches, n = _image_batches(model, images, batch_size, num_workers)
    with _kernels(model, kernels, device):
        return _run(model.encode_image, batches, n, "images/s", device, dtype, next(model.parameters()).dtype,
                    normalize, progress)


def encode_texts(model, texts, *, batch_size: int = 256, normalize: bool = True, device=None, dtype=None,
                 progress: bool = True, kernels="auto") -> torch.Tensor:
    """(N, E) fp32 text embeddings: ``texts`` a list of strings (the model's tokenizer) or token ids (N, L).
    ``kernels``: see the module docstring."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = _device_dtype(model, device, dtype)
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.is_floating_point():
            raise ValueError(f"texts must be a list of strings or integer token ids (N, L), got "
                             f"{texts.dtype} {tuple(texts.shape)}")
        tokens = texts
    elif isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts):
        from mmfast.models.clip.model import get_tokenizer

        tokens = get_tokenizer(model)(list(texts)) if texts else torch.zeros(0, 1, dtype=torch.long)
    else:
        raise TypeError(f"texts must be a list of strings or a (N, L) token tensor, got {type(texts).__name__}")
    batches = (tokens[i: i + batch_size] for i in range(0, tokens.shape[0], batch_size))
    with _kernels(model, kernels, device):
        return _run(model.encode_text, batches, tokens.shape[0], "texts/s", device, dtype,
                    next(model.parameters()).dtype, normalize, progress)


__all__ = ["IMAGE_SUFFIXES", "LAST_RATE", "encode_images", "encode_texts", "list_images"]

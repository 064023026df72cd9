"""LLaVA training data: image preprocessing, tokenized samples, padded batches, modality grouping.

Records come from :func:`mmfast.data.llava.load_llava_json` (LLaVA JSON + an image folder; text-only
records allowed). Each sample is ``{"input_ids", "labels", "pixel_values" (3, H, W) or None}``; a batch
right-pads ids with the pad token and labels with -100 and stacks the images of the samples that have
one (``pixel_values`` (n_images, 3, H, W), in row order).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mmfast.models.llava.templates import IGNORE_INDEX, tokenize_conversation

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessor:
    """CLIP preprocessing with LLaVA's ``image_aspect_ratio``: ``"pad"`` pads to a square with the mean
    colour first (nothing is cropped); ``"resize"`` squashes; ``"crop"`` resizes the short side and
    centre-crops (CLIP's own)."""

    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    aspect: str = "pad"

    def __post_init__(self):
        if self.aspect not in ("pad", "resize", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad', 'resize' or 'crop', got {self.aspect!r}")

    def _square(self, image):
        from PIL import Image

        w, h = image.size
        if self.aspect == "pad" and w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), tuple(round(255 * m) for m in self.mean))
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            return canvas
        if self.aspect == "crop" and w != h:
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            return image.crop((left, top, left + side, top + side))
        return image

    def __call__(self, image) -> torch.Tensor:
        """A PIL image -> normalised (3, S, S) float tensor."""
        import numpy as np
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        image = self._square(image.convert("RGB")).resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def to_hf(self):
        """The equivalent transformers ``CLIPImageProcessor`` (for llava-hf's processor)."""
        from transformers import CLIPImageProcessor

        size = {"shortest_edge": self.image_size}
        return CLIPImageProcessor(size=size, crop_size={"height": self.image_size, "width": self.image_size},
                                  image_mean=list(self.mean), image_std=list(self.std), do_center_crop=True,
                                  do_convert_rgb=True)


class LlavaSupervisedDataset(torch.utils.data.Dataset):
    """Tokenized LLaVA records for one template; images are opened and preprocessed per item."""

    def __init__(self, records: list[dict], tokenizer, template: str, image_processor: ImageProcessor,
                 n_image_tokens: int, model_max_length: int):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.image_processor, self.n_image_tokens = image_processor, n_image_tokens
        self.model_max_length = model_max_length

    def __len__(self) -> int:
        return len(self.records)

    def modality_lengths(self) -> list[int]:
        """Word-count length per record, positive with an image and negative without (LLaVA's trick)."""
        out = []
        for r in self.records:
            n = sum(len(t["value"].split()) for t in r["conversations"])
            out.append(n + self.n_image_tokens if "image_path" in r else -n)
        return out

    def __getitem__(self, idx: int) -> dict:
        from mmfast.utils.io import open_image

        rec = self.records[idx]
        has_image = "image_path" in rec
        try:
            sample = tokenize_conversation(rec["conversations"], self.tokenizer, self.template, self.n_image_tokens,
                                           self.model_max_length, has_image=has_image)
        except ValueError as e:
            raise ValueError(f"record {idx} (id {rec.get('id')!r}): {e}") from e
        sample["pixel_values"] = self.image_processor(open_image(rec["image_path"])) if has_image else None
        return sample


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """Right-padded ``input_ids``/``labels``/``attention_mask`` (B, L) and stacked images."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(s["input_ids"].numel() for s in samples)
    b = len(samples)
    ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = s["input_ids"].numel()
        ids[i, :n] = s["input_ids"]
        labels[i, :n] = s["labels"]
        mask[i, :n] = 1
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack(images) if images else None}


def modality_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """LLaVA's ``group_by_modality_length``: a shuffled order whose consecutive ``batch_size`` chunks
    hold one modality (image or text-only: the sign of ``lengths``) and similar lengths."""
    rng = random.Random(seed)
    mm = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n <= 0]

    def chunks(idx: list[int]) -> list[list[int]]:
        rng.shuffle(idx)
        mega = batch_size * 8
        out = []
        for s in range(0, len(idx), mega):
            group = sorted(idx[s: s + mega], key=lambda i: -abs(lengths[i]))
            out += [group[k: k + batch_size] for k in range(0, len(group), batch_size)]
        return out

    batches = chunks(mm) + chunks(text)
    full = [c for c in batches if len(c) == batch_size]
    rest = [i for c in batches if len(c) < batch_size for i in c]  # mixed leftovers go last
    rng.shuffle(full)
    return [i for c in full for i in c] + rest


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageProcessor", "LlavaSupervisedDataset", "collate", "modality_grouped_order"]

"""Training data plumbing shared by the recipes: image-text sources and one resumable batch order.

Sources (CLIP's ``--data``):
* an image-text CSV (``filepath,caption`` header, paths relative to the CSV's folder);
* a folder holding ``captions_train.csv`` (the synthetic world, or any folder laid out like it);
* webdataset shards: a ``.tar`` file, a brace range (``shard-{000000..000009}.tar``), a folder of
  them, or a glob; members ``KEY.{png,jpg,...}`` paired with ``KEY.txt``.

Exact resume: the order of step s is a function of (seed, s) only — a permutation per epoch (or a
caller's grouping, e.g. LLaVA's by modality and length), sliced into global batches, each rank taking
its slice — and each CLIP sample's augmentation draws from a generator seeded by (seed, epoch, index).
A run resumed at step s therefore sees the same batches, with the same crops, as the uninterrupted
run, whatever the number of loader workers.
"""
from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler


def open_source(data: str, transform, tokenizer, img_key: str = "filepath", caption_key: str = "caption"):
    """The image-text dataset behind ``--data`` (see the module docstring)."""
    from mmfast.data.imagetext import ImageTextDataset
    from mmfast.data.webdataset import TarImageTextDataset

    p = Path(data)
    if p.is_file() and p.suffix == ".tar":
        return TarImageTextDataset([p], transform, tokenizer)
    if p.is_file():
        return ImageTextDataset(p, transform=transform, tokenizer=tokenizer, img_key=img_key, caption_key=caption_key)
    if p.is_dir():
        if (p / "captions_train.csv").is_file():
            return ImageTextDataset(p / "captions_train.csv", transform=transform, tokenizer=tokenizer)
        shards = sorted(p.glob("*.tar"))
        if shards:
            return TarImageTextDataset(shards, transform, tokenizer)
        raise FileNotFoundError(f"--data folder {p} has neither captions_train.csv nor *.tar shards")
    if "{" in data:
        return TarImageTextDataset(data, transform, tokenizer)
    shards = sorted(Path(s) for s in glob.glob(data))
    if shards:
        return TarImageTextDataset(shards, transform, tokenizer)
    raise FileNotFoundError(f"--data {data!r}: no such CSV file, folder or shard pattern")


class SeededPairs(Dataset):
    """Items keyed by (epoch, index): the random augmentation of each draws from its own seed."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, idx = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (the transforms draw from it): torch.manual_seed would also queue a
            # seed for every accelerator module, each capturing a stack trace while CUDA is not initialised
            # (0.1 s a step of 64 samples on CPU; the same seed, the same draws)
            torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + idx)
            return self.base[idx]


def seeded_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order of ``n`` items (the default order of :class:`ResumableBatches`)."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


class ResumableBatches(Sampler):
    """Per-rank batches for steps ``start .. total-1`` (drop-last epochs).

    Global batch g of epoch e is ``order(e)[g·B·W : (g+1)·B·W]``; rank r takes its r-th slice of B.
    ``order(epoch)`` defaults to a permutation seeded by (seed, epoch); pass another (e.g. LLaVA's
    modality/length grouping) as a function of the epoch. With ``keyed=True`` each item is
    ``(epoch, index)``, for datasets whose augmentation is seeded per epoch (:class:`SeededPairs`).
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int, total: int,
                 order: Callable[[int], Sequence[int]] | None = None, keyed: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {n} items is smaller than one global batch ({batch_size} x {world} ranks)")
        self.n, self.b, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.total, self.keyed = start, total, keyed
        self.order = order or (lambda epoch: seeded_permutation(n, seed, epoch))

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        epoch, order = -1, None
        gb = self.b * self.world
        for step in range(self.start, self.total):
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.order(e)
            lo = k * gb + self.rank * self.b
            batch = [int(i) for i in order[lo: lo + self.b]]
            yield [(e, i) for i in batch] if self.keyed else batch

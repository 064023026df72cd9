"""Data for training/train_clip.py: image-text sources and a resumable, rank-sharded batch order.

Sources (``--data``):
* an image-text CSV (``filepath,caption`` header, paths relative to the CSV's folder);
* a folder holding ``captions_train.csv`` (the synthetic world, or any folder laid out like it);
* webdataset shards: a ``.tar`` file, a brace range (``shard-{000000..000009}.tar``), a folder of
  them, or a glob; members ``KEY.{png,jpg,...}`` paired with ``KEY.txt``.

Exact resume: the order of step s is a function of (seed, s) only — a permutation per epoch, sliced
into global batches, each rank taking its slice — and each sample's augmentation draws from a
generator seeded by (seed, epoch, index). A run resumed at step s therefore sees the same batches,
with the same crops, as the uninterrupted run, whatever the number of loader workers.
"""
from __future__ import annotations

import glob
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from mmfast.data.imagetext import ImageTextDataset
from mmfast.data.webdataset import TarImageTextDataset


def open_source(data: str, transform, tokenizer, img_key: str = "filepath", caption_key: str = "caption"):
    """The dataset behind ``--data`` (see the module docstring)."""
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
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + idx)
            return self.base[idx]


class ShardedBatches(Sampler):
    """Per-rank batches of (epoch, index) keys for steps ``start .. total-1`` (drop-last epochs).

    Global batch g of epoch e is ``perm_e[g·B·W : (g+1)·B·W]`` with ``perm_e`` a permutation seeded by
    (seed, e); rank r takes its r-th slice of B.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int, total: int):
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {n} pairs is smaller than one global batch ({batch_size} x {world} ranks)")
        self.n, self.b, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.total = start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        epoch, perm = -1, None
        gb = self.b * self.world
        for step in range(self.start, self.total):
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            lo = k * gb + self.rank * self.b
            yield [(e, int(i)) for i in perm[lo: lo + self.b]]

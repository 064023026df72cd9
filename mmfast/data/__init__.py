"""Dataset formats and the synthetic world. Each name loads its module on first use.

- ``imagetext``: image-text CSV/TSV (CLIP), ``ImageTextDataset``
- ``webdataset``: tar shards of ``{key}.png/.jpg`` + ``{key}.txt`` (stdlib ``tarfile``)
- ``llava``: LLaVA conversation JSON, ``load_llava_json`` / ``LlavaDataset``
- ``coco``: COCO instances and POPE's ``{"image", "objects"}`` JSONL
- ``media``: WAV audio, GIF/frame-folder video, text->media (T2X) pairs
- ``synthetic``: ``make_world``, the embedded default dataset (``mmfast data synth``)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageTextDataset": "imagetext",
    "read_image_text_csv": "imagetext",
    "TarImageTextDataset": "webdataset",
    "write_shards": "webdataset",
    "csv_to_shards": "webdataset",
    "LlavaDataset": "llava",
    "LlavaFormatError": "llava",
    "load_llava_json": "llava",
    "CocoInstances": "coco",
    "load_coco": "coco",
    "load_objects_jsonl": "coco",
    "read_wav": "media",
    "read_video": "media",
    "load_t2x_json": "media",
    "make_world": "synthetic",
}


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'mmfast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmfast.data.{mod}"), name)


__all__ = list(_EXPORTS)

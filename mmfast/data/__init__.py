"""Dataset formats and the synthetic world. Each name loads its module on first use.

- ``imagetext``: image-text CSV/TSV (CLIP), ``ImageTextDataset``
- ``webdataset``: tar shards of ``{key}.png/.jpg`` + ``{key}.txt`` (stdlib ``tarfile``)
- ``llava``: LLaVA conversation JSON, ``load_llava_json`` / ``LlavaDataset``
- ``coco``: COCO instances and POPE's ``{"image", "objects"}`` JSONL
- ``media``: WAV audio, GIF/frame-folder video, text->media (T2X) pairs
- ``synthetic``: ``make_world``, the embedded default dataset (``mmfast data synth``)
"""

from __future__ import annotations

from mmfast.utils import lazy_names

_EXPORTS = {  # submodule: the names loaded from it on first use
    "imagetext": ("ImageTextDataset", "read_image_text_csv"),
    "webdataset": ("TarImageTextDataset", "write_shards", "csv_to_shards"),
    "llava": ("LlavaDataset", "LlavaFormatError", "load_llava_json"),
    "coco": ("CocoInstances", "load_coco", "load_objects_jsonl"),
    "media": ("read_wav", "read_video", "load_t2x_json"),
    "synthetic": ("make_world",),
}

__getattr__ = lazy_names(__name__, _EXPORTS)

__all__ = [name for names in _EXPORTS.values() for name in names]

"""LLaVA-format conversation data (``llava_instruct_150k.json``, ``blip_laion_cc_sbu_558k.json``, ...).

A file is a JSON list of records::

    {"id": "...", "image": "relative/path.png",            # "image" is absent for text-only records
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

Turns alternate human, gpt, human, ...; a record with an image has exactly one ``<image>`` token, in
its first human turn. Extra fields (such as ``type``) are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmfast.data.imagetext import _torch_dataset_base
from mmfast.utils.io import open_image, read_json, safe_join

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")


class LlavaFormatError(ValueError):
    """A record breaks the LLaVA format; the message names the file, record index and field."""


def validate_record(rec: Any, where: str) -> None:
    """Raise LlavaFormatError naming ``where`` (file and record index) and the offending field."""
    if not isinstance(rec, dict):
        raise LlavaFormatError(f"{where}: expected an object, got {type(rec).__name__}")
    if "id" not in rec:
        raise LlavaFormatError(f"{where}: missing field 'id'")
    conv = rec.get("conversations")
    if conv is None:
        raise LlavaFormatError(f"{where}: missing field 'conversations'")
    if not isinstance(conv, list) or not conv:
        raise LlavaFormatError(f"{where}: field 'conversations' must be a non-empty list of turns")
    has_image = "image" in rec
    if has_image and (not isinstance(rec["image"], str) or not rec["image"]):
        raise LlavaFormatError(
            f"{where}: field 'image' must be a non-empty relative path string, got {rec['image']!r}"
        )
    for t, turn in enumerate(conv):
        field = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise LlavaFormatError(f"{where}: field '{field}' must be an object with 'from' and 'value'")
        role = turn.get("from")
        if role not in ROLES:
            raise LlavaFormatError(f"{where}: field '{field}.from' is {role!r}; expected 'human' or 'gpt'")
        if role != ROLES[t % 2]:
            raise LlavaFormatError(
                f"{where}: field '{field}.from' is {role!r}; turns must alternate human, gpt, ..."
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise LlavaFormatError(
                f"{where}: field '{field}.value' must be a string, got {type(value).__name__}"
            )
        n_tok = value.count(IMAGE_TOKEN)
        if t == 0 and has_image and n_tok != 1:
            raise LlavaFormatError(
                f"{where}: field '{field}.value' must hold {IMAGE_TOKEN} once "
                f"(the record has an image), found {n_tok}"
            )
        if n_tok and (t > 0 or not has_image):
            raise LlavaFormatError(
                f"{where}: field '{field}.value' holds {IMAGE_TOKEN} but "
                + ("only the first human turn may" if has_image else "the record has no 'image'")
            )


def load_llava_json(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, check_images: bool = True
) -> list[dict]:
    """Load and validate a LLaVA JSON file.

    Each returned record is the original dict plus ``image_path`` (absolute, inside ``image_root``;
    default the file's folder) when it has an image. ``check_images`` also requires each image file to
    exist. Errors name the file, the record index and the field.
    """
    p = Path(path)
    data = read_json(p, what="LLaVA JSON file")
    if not isinstance(data, list):
        raise LlavaFormatError(f"LLaVA JSON file {p}: expected a list of records, got {type(data).__name__}")
    root = Path(image_root) if image_root is not None else p.parent
    out = []
    for i, rec in enumerate(data):
        where = f"LLaVA JSON file {p} record {i}"
        validate_record(rec, where)
        if "image" in rec:
            try:
                full = safe_join(root, rec["image"], what=f"{where} field 'image'")
            except ValueError as e:
                raise LlavaFormatError(str(e)) from e
            if check_images and not full.is_file():
                raise FileNotFoundError(f"{where} field 'image': {full} not found")
            rec = {**rec, "image_path": str(full)}
        out.append(rec)
    return out


class LlavaDataset(_torch_dataset_base()):
    """Records of a LLaVA JSON file: ``{"id", "image" (transformed, PIL, or None), "conversations"}``.

    Tokenization and loss masks belong to the model's processor; this class only reads.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        check_images: bool = True,
    ):
        self.records = load_llava_json(path, image_root, check_images=check_images)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict:
        rec = self.records[idx]
        image = None
        if "image_path" in rec:
            image = open_image(rec["image_path"])
            if self.transform is not None:
                image = self.transform(image)
        return {"id": rec["id"], "image": image, "conversations": rec["conversations"]}

"""COCO instances files and POPE's ``{"image", "objects"}`` JSONL, validated on load.

``load_coco`` checks the fields the rest of mmfast relies on (ids, file names, boxes, categories) and
names the offending record; ``CocoInstances.to_pycocotools()`` hands the same data to pycocotools
for the official evaluation code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfast.utils.io import read_json, read_jsonl, safe_join


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class CocoInstances:
    path: Path
    image_root: Path
    data: dict
    images: dict[int, dict] = field(default_factory=dict)  # id -> image record
    categories: dict[int, dict] = field(default_factory=dict)  # id -> category record
    anns_by_image: dict[int, list[dict]] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """Category names in ascending category-id order."""
        return [self.categories[k]["name"] for k in sorted(self.categories)]

    def image_path(self, image_id: int) -> Path:
        im = self.images[image_id]
        return safe_join(self.image_root, im["file_name"], what=f"{self.path} image {image_id} file_name")

    def objects(self, image_id: int) -> list[str]:
        """Distinct category names in the image, in annotation order."""
        names = (self.categories[a["category_id"]]["name"] for a in self.anns_by_image.get(image_id, []))
        return list(dict.fromkeys(names))

    def objects_records(self) -> list[dict]:
        """POPE's input records ``{"image": file_name, "objects": [...]}``, one per image, in file order."""
        return [{"image": im["file_name"], "objects": self.objects(im["id"])} for im in self.data["images"]]

    def to_pycocotools(self):
        from pycocotools.coco import COCO  # optional dependency, needed only for official metrics

        coco = COCO()
        coco.dataset = self.data
        coco.createIndex()
        return coco


def load_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> CocoInstances:
    """Load a COCO instances JSON; ``image_root`` defaults to the folder above ``annotations/``
    when the file sits in one (COCO's own layout), else the file's folder."""
    p = Path(path)
    data = read_json(p, what="COCO annotation file")
    if not isinstance(data, dict):
        raise ValueError(f"COCO annotation file {p}: expected an object, got {type(data).__name__}")  # noqa: TRY004
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO annotation file {p}: missing list field {key!r}")  # noqa: TRY004
    if image_root is None:
        image_root = p.parent.parent if p.parent.name == "annotations" else p.parent
    out = CocoInstances(path=p, image_root=Path(image_root), data=data)

    def bad(kind: str, i: int, msg: str) -> ValueError:
        return ValueError(f"COCO annotation file {p} {kind}[{i}]: {msg}")

    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise bad("categories", i, "expected {'id': int, 'name': str}")
        if c["id"] in out.categories:
            raise bad("categories", i, f"duplicate category id {c['id']}")
        out.categories[c["id"]] = c
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            raise bad("images", i, "missing integer field 'id'")
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise bad("images", i, "missing string field 'file_name'")
        for k in ("width", "height"):
            if k in im and not (isinstance(im[k], int) and im[k] > 0):
                raise bad("images", i, f"field {k!r} must be a positive integer, got {im[k]!r}")
        if im["id"] in out.images:
            raise bad("images", i, f"duplicate image id {im['id']}")
        out.images[im["id"]] = im
    for i, a in enumerate(data["annotations"]):
        _check_annotation(a, i, out, bad)
        out.anns_by_image.setdefault(a["image_id"], []).append(a)
    return out


def _check_annotation(a: Any, i: int, out: CocoInstances, bad) -> None:
    if not isinstance(a, dict):
        raise bad("annotations", i, f"expected an object, got {type(a).__name__}")
    for k in ("id", "image_id", "category_id"):
        if not isinstance(a.get(k), int):
            raise bad("annotations", i, f"missing integer field {k!r}")
    if a["image_id"] not in out.images:
        raise bad("annotations", i, f"image_id {a['image_id']} is not in 'images'")
    if a["category_id"] not in out.categories:
        raise bad("annotations", i, f"category_id {a['category_id']} is not in 'categories'")
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_num(v) for v in box)):
        raise bad("annotations", i, f"field 'bbox' must be [x, y, w, h] numbers, got {box!r}")
    if box[2] < 0 or box[3] < 0:
        raise bad("annotations", i, f"bbox {box} has a negative width or height")


def load_objects_jsonl(path: str | os.PathLike) -> list[dict]:
    """POPE's ``{"image": str, "objects": [str, ...]}`` lines; errors name the file and line."""
    p = Path(path)
    recs = read_jsonl(p, what="objects JSONL file")
    # read_jsonl skips blank lines; count them back so errors point at the real line.
    lines = [n for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    for r, line in zip(recs, lines):
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not r["image"]:
            raise ValueError(f"objects JSONL file {p} line {line}: missing string field 'image'")
        objs = r.get("objects")
        if not isinstance(objs, list) or not all(isinstance(o, str) for o in objs):
            raise ValueError(f"objects JSONL file {p} line {line}: field 'objects' must be a list of strings")
    return recs

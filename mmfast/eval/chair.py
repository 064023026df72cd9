"""CHAIR (Rohrbach et al., EMNLP 2018): how many objects a caption names that are not in the image.

    CHAIR_i = hallucinated object mentions / all object mentions      (over every caption)
    CHAIR_s = captions with at least one hallucinated mention / captions

As in the paper, every mention counts (two "dogs" sentences count twice), words are matched after
folding plurals and synonyms onto the annotation's class names, and a few two-word phrases are
read as one ("hot dog" is food, "baby elephant" an elephant, "toilet seat" not a chair). The
vocabulary is the classes of the given instances file: COCO classes use our synonym table below,
other class names (the synthetic world's) match themselves and their plurals, plus ``EXTRA_SYNONYMS``
and any ``synonyms`` passed in. Ground truth is the image's instance annotations, optionally
widened with the objects named by reference captions (``gt_captions``), which the paper also does.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Our own synonym table for the 80 COCO classes (class name first is implied).
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": ["people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "guy", "lady",
               "gentleman", "adult", "teenager", "player", "skier", "snowboarder", "surfer", "skateboarder",
               "rider", "biker", "cyclist", "pedestrian", "passenger", "worker", "chef", "officer",
               "policeman", "soldier", "tourist", "spectator", "batter", "pitcher", "catcher", "umpire",
               "mother", "father", "daughter", "son", "bride", "groom", "cowboy", "athlete", "human"],
    "bicycle": ["bike"],
    "car": ["automobile", "sedan", "taxi", "cab", "suv", "jeep", "minivan", "van", "hatchback"],
    "motorcycle": ["motorbike", "motor bike", "motor cycle", "scooter", "moped", "dirt bike"],
    "airplane": ["plane", "aeroplane", "air plane", "jet", "airliner", "aircraft", "jetliner"],
    "bus": ["school bus", "double decker", "minibus"],
    "train": ["locomotive", "tram", "streetcar", "trolley", "railcar"],
    "truck": ["pickup", "pickup truck", "lorry", "fire truck", "firetruck"],
    "boat": ["ship", "sailboat", "canoe", "kayak", "yacht", "ferry", "vessel", "rowboat", "speedboat"],
    "traffic light": ["stoplight", "stop light", "traffic signal", "street light"],
    "fire hydrant": ["hydrant"],
    "stop sign": [],
    "parking meter": [],
    "bench": [],
    "bird": ["pigeon", "seagull", "gull", "duck", "goose", "parrot", "swan", "owl", "eagle", "sparrow",
             "crow", "hawk", "pelican", "flamingo", "penguin"],
    "cat": ["kitten", "kitty"],
    "dog": ["puppy", "pup", "doggy"],
    "horse": ["pony", "foal", "stallion", "mare"],
    "sheep": ["lamb", "ram"],
    "cow": ["cattle", "bull", "calf", "ox", "heifer"],
    "elephant": [],
    "bear": ["polar bear", "grizzly", "grizzly bear", "brown bear", "black bear"],
    "zebra": [],
    "giraffe": [],
    "backpack": ["rucksack", "knapsack", "back pack"],
    "umbrella": ["parasol"],
    "handbag": ["purse", "hand bag", "clutch"],
    "tie": ["necktie", "bow tie"],
    "suitcase": ["luggage", "suit case", "baggage"],
    "frisbee": ["flying disc"],
    "skis": ["ski"],
    "snowboard": [],
    "sports ball": ["ball", "football", "soccer ball", "basketball", "tennis ball", "volleyball", "softball"],
    "kite": [],
    "baseball bat": ["bat"],
    "baseball glove": ["mitt", "glove"],
    "skateboard": ["skate board"],
    "surfboard": ["surf board"],
    "tennis racket": ["racket", "racquet", "tennis racquet"],
    "bottle": ["wine bottle", "water bottle"],
    "wine glass": ["wineglass"],
    "cup": ["mug", "teacup", "coffee cup"],
    "fork": [],
    "knife": [],
    "spoon": [],
    "bowl": [],
    "banana": [],
    "apple": [],
    "sandwich": ["burger", "hamburger"],
    "orange": [],
    "broccoli": [],
    "carrot": [],
    "hot dog": ["hotdog"],
    "pizza": [],
    "donut": ["doughnut"],
    "cake": ["cupcake", "cheesecake"],
    "chair": ["stool", "armchair", "recliner"],
    "couch": ["sofa", "loveseat"],
    "potted plant": ["houseplant", "house plant", "plant", "flower pot", "flowerpot"],
    "bed": [],
    "dining table": ["table"],
    "toilet": ["urinal"],
    "tv": ["television", "tv screen", "flat screen"],
    "laptop": ["laptop computer", "notebook computer"],
    "mouse": ["computer mouse"],
    "remote": ["remote control", "controller"],
    "keyboard": [],
    "cell phone": ["cellphone", "phone", "smartphone", "mobile phone", "iphone"],
    "microwave": ["microwave oven"],
    "oven": ["stove", "stove top oven"],
    "toaster": [],
    "sink": [],
    "refrigerator": ["fridge"],
    "book": ["novel", "textbook"],
    "clock": [],
    "vase": [],
    "scissors": [],
    "teddy bear": ["teddy", "teddybear", "stuffed bear"],
    "hair drier": ["hair dryer", "hairdryer", "blow dryer"],
    "toothbrush": ["tooth brush"],
}
# Synonyms for class names outside COCO (the synthetic world's icons).
EXTRA_SYNONYMS: dict[str, list[str]] = {"moon": ["crescent"], "house": ["home"], "tree": [], "fish": []}

# Words before an animal / vehicle that would otherwise read as a person ("baby elephant").
_ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"]
_QUALIFIERS = ["baby", "adult", "young", "mother"]
# Phrases that name no object although a word in them does.
_NOT_OBJECTS = ["toilet paper", "orange juice", "apple juice", "bus stop", "train station", "tennis court",
                "baseball field", "baseball game", "ski slope", "ski lift", "ski resort", "hot sauce", "dining room",
                "cell tower", "stop motion", "teddy boy"]

_IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
              "knife": "knives", "ox": "oxen", "sheep": "sheep", "calf": "calves", "goose": "geese", "bus": "buses",
              "fish": "fish", "cattle": "cattle", "luggage": "luggage", "baggage": "baggage", "broccoli": "broccoli",
              "people": "people", "gentleman": "gentlemen", "policeman": "policemen", "shelf": "shelves"}


def plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("ss", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("s"):
        return word  # already plural-only (skis, scissors)
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class Vocabulary:
    """Phrase (tuple of words) -> class name, matched longest first."""

    def __init__(self, classes: Iterable[str], synonyms: Mapping[str, Sequence[str]] | None = None):
        self.classes = list(dict.fromkeys(classes))
        table: dict[tuple[str, ...], str | None] = {}
        extra = dict(synonyms or {})

        def add(phrase: str, cls: str | None) -> None:
            toks = tuple(tokenize(phrase))
            if not toks:
                return
            for form in (toks, toks[:-1] + (plural(toks[-1]),)):
                # The class's own name wins over another class's synonym ("bat" vs "baseball bat").
                if form not in table or (cls is not None and tuple(tokenize(cls)) == form):
                    table[form] = cls

        for cls in self.classes:
            add(cls, cls)
        for cls in self.classes:
            for syn in [*COCO_SYNONYMS.get(cls, []), *EXTRA_SYNONYMS.get(cls, []), *extra.get(cls, [])]:
                add(syn, cls)
        for cls in self.classes:
            if cls in _ANIMALS:
                for q in _QUALIFIERS:
                    add(f"{q} {cls}", cls)
            if cls in ("airplane", "train"):
                for v in ("jet", "plane", "train"):
                    if table.get((v,)) == cls:
                        add(f"passenger {v}", cls)
        if "toilet" in self.classes:
            add("toilet seat", "toilet")
        for phrase in _NOT_OBJECTS:
            toks = tuple(tokenize(phrase))
            if any(w in table for w in [toks[:1], toks[-1:]]) or toks in table:
                table[toks] = None
                table[toks[:-1] + (plural(toks[-1]),)] = None
        unknown = set(extra) - set(self.classes)
        if unknown:
            raise ValueError(f"synonyms given for classes not in the annotations: {sorted(unknown)}")
        self.table = table
        self.longest = max((len(k) for k in table), default=1)

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """``(words, class)`` for every object mention, left to right, longest phrase first."""
        toks = tokenize(caption)
        out, i = [], 0
        while i < len(toks):
            for n in range(min(self.longest, len(toks) - i), 0, -1):
                key = tuple(toks[i: i + n])
                if key in self.table:
                    if self.table[key] is not None:
                        out.append((" ".join(key), self.table[key]))
                    i += n
                    break
            else:
                i += 1
        return out


# --------------------------------------------------------------------------- ground truth and captions
def load_instances(annotations: Any) -> tuple[list[str], dict[Any, set], dict[str, Any]]:
    """(class names, image id -> class set, file name -> image id) from a COCO instances file or dict."""
    from mmfast.utils.io import read_json

    coco = read_json(annotations, what="instances file") if isinstance(annotations, (str, Path)) else annotations
    if not isinstance(coco, Mapping) or not all(isinstance(coco.get(k), list) for k in ("images", "categories",
                                                                                             "annotations")):
        raise ValueError("annotations must be a COCO instances file with 'images', 'annotations', 'categories'")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    gt: dict[Any, set] = {im["id"]: set() for im in coco["images"]}
    for a in coco["annotations"]:
        if a["image_id"] in gt and a.get("category_id") in names:
            gt[a["image_id"]].add(names[a["category_id"]])
    by_file = {}
    for im in coco["images"]:
        by_file[im["file_name"]] = im["id"]
        by_file.setdefault(Path(im["file_name"]).name, im["id"])
    return list(names.values()), gt, by_file


def _caption_rows(captions: Any) -> list[dict]:
    from mmfast.eval.pope import load_lines

    if isinstance(captions, (str, Path)):
        rows, _ = load_lines(captions, "captions file")
        if len(rows) == 1 and isinstance(rows[0], Mapping) and "imgToEval" in rows[0]:
            rows = [rows[0]]
    else:
        rows = list(captions) if not isinstance(captions, Mapping) else [captions]
    if len(rows) == 1 and isinstance(rows[0], Mapping) and isinstance(rows[0].get("imgToEval"), Mapping):
        rows = list(rows[0]["imgToEval"].values())  # the original CHAIR input format
    return rows


def _resolve_image(row: Mapping, i: int, gt: Mapping, by_file: Mapping, qid_to_image: Mapping) -> Any:
    if "image_id" in row:
        key = row["image_id"]
        for k in (key, int(key) if str(key).isdigit() else None):
            if k in gt:
                return k
        raise ValueError(f"caption {i}: image_id {key!r} is not in the instances file")
    image = row.get("image")
    if image is None and "question_id" in row:
        image = qid_to_image.get(row["question_id"])
        if image is None:
            raise ValueError(f"caption {i}: question_id {row['question_id']!r} has no image (pass the questions file)")
    if image is None:
        raise ValueError(f"caption {i}: needs 'image_id', 'image' or 'question_id' (with questions), got {dict(row)!r:.160}")
    for name in (image, Path(str(image)).name):
        if name in by_file:
            return by_file[name]
    raise ValueError(f"caption {i}: image {image!r} is not in the instances file")


def _caption_text(row: Mapping, i: int) -> str:
    for key in ("caption", "text", "answer"):
        if isinstance(row.get(key), str):
            return row[key]
    raise ValueError(f"caption {i}: needs a 'caption', 'text' (LLaVA answers) or 'answer' string")


def chair(
    captions: Any,
    annotations: Any,
    questions: Any = None,
    gt_captions: Any = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """CHAIR_i, CHAIR_s and per-caption mentions / hallucinations.

    ``captions``: path or rows with an image key (``image_id``, ``image``, or ``question_id`` looked up
    in ``questions``) and a text key (``caption``, ``text`` or ``answer``).
    """
    from mmfast.eval.pope import load_lines

    classes, gt, by_file = load_instances(annotations)
    vocab = Vocabulary(classes, synonyms)
    qid_to_image = {}
    if questions is not None:
        qid_to_image = {q["question_id"]: q["image"] for q in load_lines(questions, "questions file")[0]}
    gt = {k: set(v) for k, v in gt.items()}
    if gt_captions is not None:
        from mmfast.utils.io import read_json

        caps = read_json(gt_captions, what="reference captions") if isinstance(gt_captions, (str, Path)) else gt_captions
        for a in caps["annotations"]:
            if a["image_id"] in gt:
                gt[a["image_id"]].update(c for _, c in vocab.mentions(a["caption"]))
    rows = _caption_rows(captions)
    if not rows:
        raise ValueError("no captions to score")
    per, n_mentions, n_hall, n_hall_caps = [], 0, 0, 0
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise TypeError(f"caption {i}: expected a JSON object, got {row!r:.80}")
        image_id = _resolve_image(row, i, gt, by_file, qid_to_image)
        text = _caption_text(row, i)
        mentions = vocab.mentions(text)
        hall = [(w, c) for w, c in mentions if c not in gt[image_id]]
        n_mentions += len(mentions)
        n_hall += len(hall)
        n_hall_caps += bool(hall)
        per.append({
            "image_id": image_id, "caption": text,
            "mentioned": [list(m) for m in mentions], "hallucinated": [list(h) for h in hall],
            "hallucinated_objects": sorted({c for _, c in hall}), "gt_objects": sorted(gt[image_id]),
            "chair_i": len(hall) / len(mentions) if mentions else 0.0,
        })
    return {
        "CHAIR_i": n_hall / n_mentions if n_mentions else 0.0,
        "CHAIR_s": n_hall_caps / len(rows),
        "n_captions": len(rows), "n_mentions": n_mentions, "n_hallucinated": n_hall,
        "n_hallucinated_captions": n_hall_caps, "captions": per,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmfast eval chair", description="CHAIR_i / CHAIR_s of captions.")
    ap.add_argument("--captions", required=True, help="JSONL/JSON captions (LLaVA answer lines accepted)")
    ap.add_argument("--annotations", required=True, help="COCO instances JSON (ground-truth objects)")
    ap.add_argument("--questions", default=None, help="question file mapping question_id -> image")
    ap.add_argument("--gt-captions", default=None, help="COCO captions JSON to widen the ground truth")
    ap.add_argument("--synonyms", default=None, help="JSON {class: [synonym, ...]} added to ours")
    ap.add_argument("--out", default=None, help="write the full result (per caption) as JSON here")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args(argv)
    try:
        syn = None
        if args.synonyms:
            from mmfast.utils.io import read_json

            syn = read_json(args.synonyms, what="synonyms file")
        res = chair(args.captions, args.annotations, args.questions, args.gt_captions, syn)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"mmfast eval chair: {e}", file=sys.stderr)
        return 2
    if args.out:
        from mmfast.utils.io import atomic_write_json

        atomic_write_json(args.out, res)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"CHAIR_s {100 * res['CHAIR_s']:.2f}  CHAIR_i {100 * res['CHAIR_i']:.2f}  "
          f"({res['n_hallucinated_captions']}/{res['n_captions']} captions, "
          f"{res['n_hallucinated']}/{res['n_mentions']} mentions)")
    counts: dict[str, int] = defaultdict(int)
    for c in res["captions"]:
        for _, cls in c["hallucinated"]:
            counts[cls] += 1
    if counts:
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        print("most hallucinated: " + ", ".join(f"{k} ({v})" for k, v in top))
    return 0

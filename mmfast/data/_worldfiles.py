"""Writers for the synthetic world's instruction, pre-training and README files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmfast.data import _text
from mmfast.utils.io import atomic_open, atomic_write_json

DETAIL_PROMPTS = [
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "What is in this image? Describe every object.",
]
BRIEF_PROMPTS = [
    "Give a brief description of the image.",
    "Write a short caption for this picture.",
    "Summarize the image in a few words.",
    "What does this image show?",
]
YESNO_TURNS = 8  # at most, per yes/no record: more grounded decisions per image forward


def _human_first(question: str, rng) -> str:
    # LLaVA's data puts the image token either before or after the first question.
    return f"<image>\n{question}" if rng.random() < 0.7 else f"{question}\n<image>"


def _record(rid: str, rel: str, kind: str, qa: list[tuple[str, str]], rng) -> dict:
    conv = []
    for t, (q, a) in enumerate(qa):
        conv.append({"from": "human", "value": _human_first(q, rng) if t == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": rel, "type": kind, "conversations": conv}


def absent_object(scene: dict, rng, classes: list[str], asked: frozenset = frozenset()) -> str:
    """A uniformly random class that is not in the image and not in ``asked``. LLaVA's instruction data
    asks about absent things without seeking hard negatives: POPE's popular and adversarial negatives
    are its test, and a model trained on random ones shows the paper's gap between the settings."""
    present = {o["cls"] for o in scene["objects"]}
    absent = [c for c in classes if c not in present and c not in asked]
    return absent[int(rng.integers(len(absent)))]


def yesno_turns(scene: dict, rng, classes, turns: int = YESNO_TURNS) -> list[tuple[str, str]]:
    """Up to ``turns`` questions about distinct classes, each answered yes or no with probability 1/2 on
    its own, until every present class has been asked about (so no answer is forced to "no" and about
    half the answers are "yes": a model polled by POPE, half yes, is not pushed towards "no").

    Independent answers matter: with exactly one yes and one no per image, the second answer follows
    from the first and a model learns that shortcut instead of looking at the image."""
    present = list(dict.fromkeys(o["cls"] for o in scene["objects"]))
    asked: set[str] = set()
    qa = []
    while len(qa) < turns and any(c not in asked for c in present):
        if rng.random() < 0.5:
            left = [c for c in present if c not in asked]
            c = left[int(rng.integers(len(left)))]
            qa.append((f"Is there {_text.article(c)} in the image?", yesno_answer(c, True)))
        else:
            c = absent_object(scene, rng, classes, frozenset(asked))
            qa.append((f"Is there {_text.article(c)} in the image?", yesno_answer(c, False)))
        asked.add(c)
    return qa


def yesno_answer(cls: str, present: bool) -> str:
    """"A cup, yes." / "A cup? No.": the object is named first and the verdict is the very next token.

    A tiny LLM then decides at the position whose input is the object's own token: one attention step
    from there to the image tokens. "Yes, there is a cup" decides before the object is named, so the
    answer position must first fetch the object from the question (two hops), which the 2-layer demo
    LLM learns more slowly. Held-out yes/no accuracy of the demo LLaVA trained on yes/no alone (40k-image
    world, batch 32, lr 1e-3): after 150 steps 0.68-0.71 with the verdict right after the object vs 0.57
    for "A cup? Yes."; after 600 steps 0.71-0.74 vs 0.70, and 0.69 for a bare "Yes" / "No".
    POPE's parser reads both forms right: "no" appears only in the negative one."""
    name = _text.article(cls)
    name = name[0].upper() + name[1:]
    return f"{name}, yes." if present else f"{name}? No."


def write_llava(out: Path, split: str, items: list[tuple[int, str, dict]], seed: int) -> None:
    """``llava_instruct_{split}.json`` (4 records per image) and ``llava_pretrain_{split}.json``."""
    from mmfast.data._world import CLASSES

    instruct, pretrain = [], []
    for image_id, rel, scene in items:
        rng = np.random.default_rng([seed, image_id, 2])
        base = f"{image_id:06d}"
        detail = [(DETAIL_PROMPTS[int(rng.integers(len(DETAIL_PROMPTS)))], _text.description(scene))]
        instruct.append(
            _record(f"{base}_conversation", rel, "conversation", _text.conversation_turns(scene, rng), rng)
        )
        instruct.append(_record(f"{base}_detail", rel, "detail", detail, rng))
        instruct.append(
            _record(f"{base}_reasoning", rel, "reasoning", _text.reasoning_turns(scene, rng), rng)
        )
        instruct.append(
            _record(f"{base}_yesno", rel, "yesno", yesno_turns(scene, rng, CLASSES), rng)
        )
        brief = [(BRIEF_PROMPTS[int(rng.integers(len(BRIEF_PROMPTS)))], _text.captions(scene, rng, 1)[0])]
        pretrain.append(_record(base, rel, "caption", brief, rng))
    atomic_write_json(out / f"llava_instruct_{split}.json", instruct, indent=None)
    atomic_write_json(out / f"llava_pretrain_{split}.json", pretrain, indent=None)


README = """# mmfast synthetic world

Generated by `mmfast data synth` (seed {seed}, {size}x{size} images). Same seed, same bytes.
Every media path inside these files is relative to this folder.

{n_train} train and {n_val} val images of {classes} icon classes (`classes.json`, in category-id
order: class i has COCO category id i+1 and zero-shot label i). Each image has 1-5 objects; the first
(main) object is clearly the largest and is the image's zero-shot label. Objects sit on a 4x4 grid
(the tiny CLIP's patches): each small one centred in a cell, the main one in a 2x2 block. Class frequencies follow a
Zipf prior over the category-id order; each image has a theme (sky, street, garden, table, pond) whose
classes appear together more often, so POPE's popular and adversarial negatives are harder than random.
Captions name classes with plain words, so zero-shot prompts like "a photo of a {{class}}" work.

| file | format |
|---|---|
| `images/{{train,val}}_NNNNNN.png` | RGB PNG |
| `annotations/instances_{{train,val}}.json` | COCO instances (bbox [x, y, w, h], area, iscrowd; colour in `attributes`) |
| `captions_{{train,val}}.csv` | `filepath,caption` (CLIP): per image, phrasings of the whole scene that name every object (counts, colours); the first names the main object alone for about 15 % of the images with several objects (always, with one) |
| `zeroshot_{{train,val}}.csv` | `filepath,label,class`: the main object's class |
| `objects_{{train,val}}.jsonl` | `{{"image", "objects"}}` per line (POPE's input) |
| `llava_instruct_{{train,val}}.json` | LLaVA conversations: conversation, detail, reasoning, yesno (up to 8 independent yes/no questions per image, until every present class was asked; half yes; answers name the object first: "A cup, yes." / "A cup? No.") |
| `llava_pretrain_{{train,val}}.json` | LLaVA caption pairs (`<image>` + brief caption) for projector pre-training |
{media}{shards}| `classes.json` | list of class names |
"""

MEDIA_ROWS = """| `audio/CLASS_NN.wav` | 16 kHz mono 16-bit, one pitch/timbre/rhythm pattern per class |
| `video/{{train,val}}_NNNNNN.gif` | animated GIF of moving objects |
| `t2x_{{image,audio,video}}.json` | text -> media pairs in NExT-GPT's layout: `{{"id", "caption", "image_name"/"audio_name"/"video_name", "split"}}` |
"""


def write_readme(out: Path, summary: dict, seed: int, size: int) -> None:
    media = MEDIA_ROWS.format() if "n_audio" in summary else ""
    shards = (
        "| `shards/{train,val}-NNNNNN.tar` | webdataset shards of the caption CSVs (`KEY.png` + `KEY.txt`) |\n"
        if "shards_train" in summary
        else ""
    )
    text = README.format(
        seed=seed,
        size=size,
        n_train=summary["n_train"],
        n_val=summary["n_val"],
        classes=summary["classes"],
        media=media,
        shards=shards,
    )
    with atomic_open(out / "README.md", "w", encoding="utf-8") as f:
        f.write(text)


def write_media(out: Path, splits: dict, seed: int, size: int, **kw) -> dict:
    from mmfast.data import _media

    return _media.write_media(out, splits, seed, size, **kw)

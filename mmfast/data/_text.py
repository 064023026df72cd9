"""Words for the synthetic world: captions, descriptions and question/answer turns about a scene.

A scene is a dict ``{"objects": [{"cls", "color", "bbox": [x, y, w, h], ...}], "bg": str, "size": S}``;
the first object is the main (largest) one.
"""

from __future__ import annotations

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_PLURAL = {"cross": "crosses", "fish": "fish"}
# Share of multi-object images whose first caption names the main object alone; the others are described
# whole (like COCO's captions, which name most of what is in the picture). The demo's CLIP learns the small
# objects only from captions that name them, and its LLaVA can only answer POPE about what the tower learned.
# Measured (2026-11-27, demo defaults, one run each), share 1.0 / 0.3 / 0.15 / 0.0: CLIP zero-shot top-1
# 0.994 / 0.968 / 0.963 / 0.832, POPE random F1 0.784 / 0.802 / 0.819 / 0.844, presence-probe AUC of the
# frozen patches 0.985 / 0.988 / 0.989 / 0.990 (the old captions, a main-only one first always: 0.965).
MAIN_CAPTION_P = 0.15


def plural(word: str, n: int = 2) -> str:
    return word if n == 1 else _PLURAL.get(word, word + "s")


def article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def join_words(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def counts(scene: dict) -> list[tuple[str, int]]:
    """(class, count) in order of first appearance."""
    out: dict[str, int] = {}
    for o in scene["objects"]:
        out[o["cls"]] = out.get(o["cls"], 0) + 1
    return list(out.items())


def count_phrase(scene: dict) -> str:
    return join_words([article(c) if n == 1 else f"{NUMBER_WORDS[n]} {plural(c)}" for c, n in counts(scene)])


def colored(o: dict) -> str:
    return f"{o['color']} {o['cls']}"


def center(o: dict) -> tuple[float, float]:
    x, y, w, h = o["bbox"]
    return x + w / 2, y + h / 2


def relation(a: dict, b: dict) -> str:
    """Where ``a`` is relative to ``b``: the dominant axis of the centre offset decides."""
    (ax, ay), (bx, by) = center(a), center(b)
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def where(o: dict, size: int) -> str:
    cx, cy = center(o)
    col = "left" if cx < size / 3 else ("right" if cx > 2 * size / 3 else "")
    row = "top" if cy < size / 3 else ("bottom" if cy > 2 * size / 3 else "")
    if col and row:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    return f"on the {col}" if col else "in the center"


def name(o: dict, scene: dict) -> str:
    """The class alone when it is unique in the scene, else colour + class (one of two circles)."""
    return o["cls"] if sum(p["cls"] == o["cls"] for p in scene["objects"]) == 1 else colored(o)


def main_captions(scene: dict) -> list[str]:
    """Phrasings about the main object alone (all of a one-object image's; see ``MAIN_CAPTION_P``)."""
    main = scene["objects"][0]
    size = "big " if len(scene["objects"]) > 1 else ""
    return [
        f"a photo of {article(colored(main))}",
        f"{article(size + colored(main))} on a {scene['bg']} background",
        f"{article(main['cls'])} {where(main, scene['size'])}",
    ]


def scene_captions(scene: dict) -> list[str]:
    """Phrasings of the whole scene: counts, colours, spatial relations; all name the main object first."""
    objs = scene["objects"]
    main, rest = objs[0], objs[1:]
    if not rest:
        return [f"a picture of a single {colored(main)}", f"one {main['cls']} {where(main, scene['size'])}"]
    others = join_words([article(colored(o)) for o in rest])
    return [
        f"{article('big ' + colored(main))} with {others}",
        f"{article(colored(main))} {relation(main, rest[0])} {article(colored(rest[0]))}",
        f"{NUMBER_WORDS[len(objs)]} objects on a {scene['bg']} background: {count_phrase(scene)}",
        f"a picture of {count_phrase(scene)}",
    ]


def caption_pool(scene: dict) -> list[str]:
    return main_captions(scene) + scene_captions(scene)


def captions(scene: dict, rng, k: int) -> list[str]:
    """``k`` distinct phrasings. One object: about it, in any wording. Several: the first names the main
    object alone with probability ``MAIN_CAPTION_P``, else it is one of the listings of every object; the
    next ones are the other listings, then (past them) the remaining phrasings."""
    first = main_captions(scene)
    out = [first[int(rng.integers(len(first)))]]
    if len(scene["objects"]) == 1:
        rest = scene_captions(scene) + [c for c in first if c != out[0]]
        extra: list[str] = []
    else:
        whole = scene_captions(scene)
        listings = [whole[0], whole[2], whole[3]]  # whole[1] names only the main object and one other
        rest = listings
        if rng.random() >= MAIN_CAPTION_P:
            out = [listings[int(rng.integers(len(listings)))]]
            rest = [c for c in listings if c != out[0]]
        extra = [c for c in whole + first if c not in out and c not in rest]
    idx = rng.permutation(len(rest))[: max(0, k - 1)]
    return out + [rest[i] for i in sorted(idx)] + extra[: max(0, k - 1 - len(rest))]


def description(scene: dict) -> str:
    """A detailed paragraph: every object with colour and place, then the background."""
    objs, size = scene["objects"], scene["size"]
    n = len(objs)
    head = f"The image shows {NUMBER_WORDS[n]} object{'s' if n > 1 else ''} on a {scene['bg']} background."
    parts = [f"The largest is {article(colored(objs[0]))} {where(objs[0], size)}."]
    for o in objs[1:]:
        parts.append(f"There is {article(colored(o))} {where(o, size)}.")
    if n > 1:
        parts.append(
            f"The {name(objs[0], scene)} is {relation(objs[0], objs[1])} the {name(objs[1], scene)}."
        )
    return " ".join([head] + parts)


def conversation_turns(scene: dict, rng) -> list[tuple[str, str]]:
    """Short multi-turn chat: what is it, what colour, where."""
    objs, size = scene["objects"], scene["size"]
    main = objs[0]
    qa = [
        ("What is the main object in this image?", f"The main object is {article(colored(main))}."),
        (f"What colour is the {main['cls']}?", f"The {main['cls']} is {main['color']}."),
        (f"Where is the {main['cls']}?", f"It is {where(main, size)} of the image."),
    ]
    if len(objs) > 1:
        o = objs[int(rng.integers(1, len(objs)))]
        qa.append(("What else can you see?", f"I can also see {count_phrase({'objects': objs[1:]})}."))
        same = [p["color"] for p in objs if p["cls"] == o["cls"]]
        if len(same) == 1:
            qa.append((f"What colour is the {o['cls']}?", f"It is {o['color']}."))
        else:
            qa.append((f"What colours are the {plural(o['cls'])}?", f"They are {join_words(same)}."))
    else:
        qa.append(("Are there any other objects?", "No, it is the only object in the image."))
    return qa


def reasoning_turns(scene: dict, rng) -> list[tuple[str, str]]:
    """Counting and relative position questions whose answers follow from the boxes."""
    objs = scene["objects"]
    n = len(objs)
    qa = [
        (
            "How many objects are in the image?",
            f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n > 1 else ''}: {count_phrase(scene)}.",
        )
    ]
    cls, k = counts(scene)[int(rng.integers(0, len(counts(scene))))]
    qa.append((f"How many {plural(cls)} are there?", f"There {'is' if k == 1 else 'are'} {NUMBER_WORDS[k]}."))
    if n > 1:
        i, j = rng.choice(n, size=2, replace=False)
        a, b = objs[int(i)], objs[int(j)]
        na, nb = name(a, scene), name(b, scene)
        if na != nb:
            qa.append((f"Where is the {na} relative to the {nb}?", f"The {na} is {relation(a, b)} the {nb}."))
            left = a if center(a)[0] < center(b)[0] else b
            qa.append(
                (
                    f"Which is further to the left, the {na} or the {nb}?",
                    f"The {name(left, scene)} is further to the left.",
                )
            )
    big = max(objs, key=lambda o: o["area"])
    qa.append(("Which object is the largest?", f"The {colored(big)} is the largest object."))
    return qa

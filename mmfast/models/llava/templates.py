"""LLaVA's conversation templates, prompt strings and supervised-label masks.

Three templates, with LLaVA's exact strings (``llava/conversation.py``'s ``conv_llava_plain``,
``conv_vicuna_v0`` without its few-shot turns, ``conv_vicuna_v1``)::

    plain       <image>A caption.\\n
    v0          SYSTEM###Human: <image>\\nWhat is it?###Assistant: A cat.###
    vicuna_v1   SYSTEM USER: <image>\\nWhat is it? ASSISTANT: A cat.</s>USER: ...

Turns are LLaVA JSON (``[{"from": "human"|"gpt", "value": ...}]``). The first human turn holding
``<image>`` is rewritten to start with ``<image>\\n`` (``plain`` keeps only the token). Labels supervise
the assistant replies and the separator that ends each of them; the system text, role names, human
turns and image tokens are -100. A conversation ending on a human turn gets the assistant's
generation prompt (``Assistant:`` / ``ASSISTANT:``; nothing for ``plain``).
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]  # (human, assistant) names as they appear in the prompt
    sep: str  # after the system text and after human turns (and after replies when sep2 is None)
    sep2: str | None  # after assistant replies (vicuna_v1: "</s>")
    style: str  # "plain" | "single" | "two"

    @property
    def stop_str(self) -> str:
        """The text that ends a reply: generation stops when it appears."""
        return self.sep2 if self.sep2 is not None else self.sep


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "", ("", ""), "\n", None, "plain"),
    "v0": Template(
        "v0",
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        ("Human", "Assistant"), "###", None, "single"),
    "vicuna_v1": Template(
        "vicuna_v1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ("USER", "ASSISTANT"), " ", "</s>", "two"),
}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    return TEMPLATES[template]


def _check_turns(conversations) -> None:
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("conversations must be a non-empty list of {'from': 'human'|'gpt', 'value': str} turns")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise TypeError(f"conversations[{i}] must be a dict with a string 'value', got {turn!r:.80}")
        expected = ("human", "gpt")[i % 2]
        if turn.get("from") != expected:
            raise ValueError(f"conversations[{i}]['from'] is {turn.get('from')!r}; turns must alternate "
                             f"human, gpt, ... starting with human (expected {expected!r})")


def _with_image_first(conversations) -> list[str]:
    """Turn texts with the first image-holding human turn rewritten to ``<image>\\n`` + its text."""
    values = [t["value"] for t in conversations]
    for i in range(0, len(values), 2):
        if IMAGE_TOKEN in values[i]:
            values[i] = (IMAGE_TOKEN + "\n" + values[i].replace(IMAGE_TOKEN, "").strip()).strip()
            break
    return values


def conversation_segments(conversations, template: str | Template) -> list[tuple[str, bool]]:
    """The prompt as ``(text, supervised)`` pieces; their concatenation is :func:`format_conversation`."""
    t = get_template(template)
    _check_turns(conversations)
    if t.style == "plain":
        if len(conversations) > 2:
            raise ValueError(f"the plain template takes one human turn and one reply, got {len(conversations)} turns")
        if IMAGE_TOKEN not in conversations[0]["value"]:
            raise ValueError(f"the plain template needs {IMAGE_TOKEN} in the human turn (image-caption pairs)")
        segs = [(IMAGE_TOKEN, False)]
        if len(conversations) == 2:
            segs.append((conversations[1]["value"] + t.sep, True))
        return segs
    values = _with_image_first(conversations)
    human, assistant = t.roles
    segs = [(t.system + t.sep, False)]
    for i, value in enumerate(values):
        if i % 2 == 0:
            segs.append((f"{human}: {value}{t.sep}", False))
        else:
            segs.append((f"{assistant}: ", False))
            segs.append((value + t.stop_str, True))
    if len(values) % 2 == 1:
        segs.append((f"{assistant}:", False))  # generation prompt
    return segs


def format_conversation(conversations, template: str | Template) -> str:
    """The prompt string LLaVA builds for these turns with ``template``."""
    return "".join(text for text, _ in conversation_segments(conversations, template))


def _supervised_chars(segments) -> list[bool]:
    flags: list[bool] = []
    for text, sup in segments:
        flags += [sup] * len(text)
    return flags


def tokenize_conversation(conversations, tokenizer, template: str | Template, n_image_tokens: int = 1,
                          max_length: int | None = None, has_image: bool | None = None) -> dict:
    """Input ids and labels (1-D LongTensors) of one conversation.

    A token is supervised when it covers a supervised non-space character (a BPE token carrying the
    space before a reply's first word belongs to the reply) or only supervised characters. The ``<image>`` token is expanded to
    ``n_image_tokens`` copies (labels -100). ``has_image`` (when given) must agree with the text: a record
    with an image needs exactly one ``<image>``, a text-only one none. ``max_length`` truncates from the
    right; it may not cut into the image tokens.
    """
    import torch

    t = get_template(template)
    segments = conversation_segments(conversations, t)
    text = "".join(s for s, _ in segments)
    sup = _supervised_chars(segments)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; add it with "
                         f"tokenizer.add_tokens([{IMAGE_TOKEN!r}], special_tokens=True)")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, labels = [], []
    n_found = 0
    for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tok == image_id:
            n_found += 1
            ids += [image_id] * n_image_tokens
            labels += [IGNORE_INDEX] * n_image_tokens
            continue
        span = range(a, min(b, len(text)))
        # A supervised word, or a token made only of supervised characters (the "\n" separator).
        covered = any(sup[c] and not text[c].isspace() for c in span) or (len(span) > 0 and all(sup[c] for c in span))
        ids.append(tok)
        labels.append(tok if covered else IGNORE_INDEX)
    if has_image is not None and n_found != int(has_image):
        raise ValueError(f"the conversation holds {n_found} {IMAGE_TOKEN} tokens but the record "
                         + ("has an image (expected exactly 1)" if has_image else "has no image (expected 0)"))
    if n_found > 1:
        raise ValueError(f"the conversation holds {n_found} {IMAGE_TOKEN} tokens; LLaVA takes one image per sample")
    if max_length is not None and len(ids) > max_length:
        if n_found and image_id in ids[max_length:]:
            raise ValueError(f"model_max_length={max_length} cuts into the {n_image_tokens} image tokens; "
                             "raise model_max_length")
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "TEMPLATES",
    "Template",
    "conversation_segments",
    "format_conversation",
    "get_template",
    "tokenize_conversation",
]

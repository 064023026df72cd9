"""LLaVA conversation templates: exact prompt strings and supervised-label masks for each template."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from mmfast.models.llava.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    conversation_segments,
    format_conversation,
    tokenize_conversation,
)

SYS_V0 = TEMPLATES["v0"].system
SYS_V1 = TEMPLATES["vicuna_v1"].system

CONV = [
    {"from": "human", "value": "What is it?\n<image>"},  # image after the text: rewritten to the front
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "It is red and white."},
]


@pytest.fixture(scope="module")
def tok():
    from mmfast.models.llava.tokenizer_tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


def test_system_prompts_are_llavas():
    assert SYS_V0 == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the human's questions.")
    assert SYS_V1 == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions.")


def test_prompt_strings():
    assert format_conversation(CONV[:2], "plain") == "<image>A cat.\n"
    assert format_conversation(CONV, "v0") == (
        SYS_V0 + "###Human: <image>\nWhat is it?###Assistant: A cat.###Human: What colour is it?###"
        "Assistant: It is red and white.###")
    assert format_conversation(CONV, "vicuna_v1") == (
        SYS_V1 + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: What colour is it? "
        "ASSISTANT: It is red and white.</s>")


def test_generation_prompt_and_text_only():
    q = [{"from": "human", "value": "<image>\nIs there a cat in the image?"}]
    assert format_conversation(q, "vicuna_v1") == SYS_V1 + " USER: <image>\nIs there a cat in the image? ASSISTANT:"
    assert format_conversation(q, "v0") == SYS_V0 + "###Human: <image>\nIs there a cat in the image?###Assistant:"
    assert format_conversation(q, "plain") == "<image>"
    text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    assert format_conversation(text_only, "vicuna_v1") == SYS_V1 + " USER: Hi ASSISTANT: Hello.</s>"


def _supervised_text(tok, sample) -> str:
    ids = [i for i, lab in zip(sample["input_ids"].tolist(), sample["labels"].tolist()) if lab != IGNORE_INDEX]
    return tok.decode(ids)


@pytest.mark.parametrize("template, expected", [
    ("v0", " A cat.### It is red and white.###"),
    ("vicuna_v1", " A cat.</s> It is red and white.</s>"),
])
def test_label_mask_multi_turn(tok, template, expected):
    s = tokenize_conversation(CONV, tok, template, n_image_tokens=5, has_image=True)
    ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
    assert len(ids) == len(labels)
    # Supervised tokens are exactly the replies and the separators that end them, in order.
    assert _supervised_text(tok, s) == expected
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    image_id = tok.convert_tokens_to_ids("<image>")
    pos = [k for k, i in enumerate(ids) if i == image_id]
    assert len(pos) == 5 and pos == list(range(pos[0], pos[0] + 5))
    assert all(labels[k] == IGNORE_INDEX for k in pos)
    # The system text and both human turns are masked.
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX and i != image_id],
                        skip_special_tokens=True)
    assert "What colour is it?" in masked and "curious" in masked


def test_label_mask_plain(tok):
    s = tokenize_conversation(CONV[:2], tok, "plain", n_image_tokens=3, has_image=True)
    assert _supervised_text(tok, s) == "A cat.\n"
    assert s["labels"].tolist()[:4] == [IGNORE_INDEX] * 4  # BOS + 3 image tokens


def test_segments_join_to_prompt():
    for name in ("v0", "vicuna_v1"):
        segs = conversation_segments(CONV, name)
        assert "".join(t for t, _ in segs) == format_conversation(CONV, name)
        assert [t for t, sup in segs if sup] == [f"A cat.{TEMPLATES[name].stop_str}",
                                                 f"It is red and white.{TEMPLATES[name].stop_str}"]


def test_truncation_and_errors(tok):
    s = tokenize_conversation(CONV, tok, "vicuna_v1", n_image_tokens=4, max_length=50, has_image=True)
    assert s["input_ids"].numel() == 50 == s["labels"].numel()
    with pytest.raises(ValueError, match="cuts into the 40 image tokens"):
        tokenize_conversation(CONV, tok, "vicuna_v1", n_image_tokens=40, max_length=45)
    with pytest.raises(ValueError, match="has an image"):
        tokenize_conversation([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}], tok, "v0",
                              has_image=True)
    with pytest.raises(ValueError, match="has no image"):
        tokenize_conversation(CONV, tok, "v0", has_image=False)
    with pytest.raises(ValueError, match="alternate"):
        format_conversation([{"from": "gpt", "value": "x"}], "v0")
    with pytest.raises(ValueError, match="template must be one of"):
        format_conversation(CONV, "chatml")
    with pytest.raises(ValueError, match="plain template"):
        format_conversation(CONV, "plain")

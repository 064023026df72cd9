"""The LLaVA system on the tiny preset: save/reload, cached generation, kernels vs plain, errors."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from llava_helpers import square_image as _image

from mmfast.models.llava import model as ml


def _batch(llava):
    conv_img = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red square."},
                {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "In the top left."}]
    conv_txt = [{"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "Three."}]
    a = llava.tokenize(conv_img, has_image=True)
    a["pixel_values"] = llava.image_processor(_image())
    b = llava.tokenize(conv_txt, has_image=False)
    b["pixel_values"] = None
    return llava.collate([a, b])


@pytest.fixture(scope="module")
def tiny():
    return ml.build_llava("tiny", kernels=False, seed=0)


def test_tiny_preset_shapes(tiny):
    assert tiny.n_image_tokens == 16  # 32 px / patch 8, CLS dropped
    assert not any(p.requires_grad for p in tiny.model.model.vision_tower.parameters())
    assert tiny.config.mmfast_model == "llava"
    batch = _batch(tiny)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert int((batch["input_ids"] == tiny.config.image_token_id).sum()) == 16
    logits = tiny.logits(batch)
    assert logits.shape == (*batch["input_ids"].shape, tiny.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_fused_loss_equals_plain_loss(tiny):
    batch = _batch(tiny)
    plain = tiny.loss(batch, fused=False)
    logits = tiny.logits(batch)[:, :-1].reshape(-1, tiny.config.text_config.vocab_size)
    by_hand = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(plain, by_hand)
    fused = tiny.loss(batch, fused=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image_attention", ["causal", "bidirectional"])
def test_patched_equals_unpatched(tiny, image_attention):
    from mmfast.models.patch import patched_rules

    fast = ml.build_llava("tiny", kernels=True, seed=0, image_attention=image_attention)
    assert "hf.attention" in patched_rules(fast.model)
    plain = ml.build_llava("tiny", kernels=False, seed=0, image_attention=image_attention)
    batch = _batch(plain)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = plain.logits(batch)
        out = fast.logits(batch)
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.loss(batch), plain.loss(batch), rtol=1e-5, atol=1e-5)


def test_bidirectional_differs_only_after_image(tiny):
    """The prefix-LM mask changes the prefix's outputs (image tokens see later image tokens)."""
    bi = ml.build_llava("tiny", kernels=False, seed=0, image_attention="bidirectional")
    batch = _batch(tiny)
    with torch.no_grad():
        c, b = tiny.logits(batch), bi.logits(batch)
    torch.testing.assert_close(b[1], c[1])  # the text-only row has no prefix
    assert (b[0] - c[0]).abs().max() > 1e-3


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear", "mlp3x_gelu"])
def test_save_reload_same_logits(tmp_path, projector):
    llava = ml.build_llava("tiny", kernels=False, seed=1, projector=projector)
    batch = _batch(llava)
    with torch.no_grad():
        before = llava.logits(batch)
    llava.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["mmfast_model"] == "llava" and cfg["model_type"] == "llava"
    assert cfg["mm_projector_type"] == projector
    again = ml.load_pretrained(tmp_path, device="cpu", kernels=False)
    with torch.no_grad():
        after = again.logits(batch)
    torch.testing.assert_close(after, before)
    if projector == "mlp2x_gelu":  # the plain HF class loads it too (llava-hf layout)
        from transformers import LlavaForConditionalGeneration

        hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path), local_files_only=True)
        assert torch.equal(hf.model.multi_modal_projector.linear_1.weight,
                           llava.model.model.multi_modal_projector.linear_1.weight)


def test_identity_projector_needs_equal_widths():
    with pytest.raises(ValueError, match="identity"):
        ml.build_llava("tiny", kernels=False, projector="identity")


def test_generation_with_cache_equals_without(tiny):
    images = [_image(), None, _image((30, 200, 30), (30, 50))]
    prompts = [tiny.prompt("What is it?"), tiny.prompt("Hello there, how are you?", with_image=False),
               tiny.prompt("Where is the green square?")]
    cached = tiny.generate(images, prompts, max_new_tokens=8, use_cache=True)
    full = tiny.generate(images, prompts, max_new_tokens=8, use_cache=False)
    assert cached == full
    assert all(isinstance(t, str) for t in cached)
    # A row's answer does not depend on the other rows of the batch (left padding is masked).
    assert tiny.generate(images[1:2], prompts[1:2], max_new_tokens=8) == cached[1:2]
    sampled = tiny.generate(images, prompts, max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)
    assert sampled == tiny.generate(images, prompts, max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)


def test_answer_contract(tiny):
    out = tiny.answer([_image(), _image()], ["Is there a cat in the image?", "Is there a car?"], max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)


def test_image_token_errors(tiny):
    batch = _batch(tiny)
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny.loss({**batch, "pixel_values": None})
    two = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="image token count mismatch"):
        tiny.loss({**batch, "pixel_values": two})
    with pytest.raises(ValueError, match="no image was given"):
        tiny.generate([None], [tiny.prompt("What is it?")])
    with pytest.raises(ValueError, match="an image was given"):
        tiny.generate([_image()], [tiny.prompt("What is it?", with_image=False)])


def test_unknown_preset_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="unknown LLaVA preset"):
        ml.build_llava("huge-nonexistent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ml.load_pretrained(tmp_path)


def test_pope_adapter_loads_our_model(tmp_path, tiny):
    from mmfast.eval.adapters import get_adapter

    tiny.save_pretrained(tmp_path / "m")
    adapter = get_adapter(tmp_path / "m", device="cpu", dtype="float32", max_new_tokens=3)
    assert adapter.kind == "llava"
    out = adapter([_image()], ["Is there a cat in the image?"])
    assert len(out) == 1 and isinstance(out[0], str)


def test_open_clip_vision_tower_conversion_is_exact(tmp_path):
    pytest.importorskip("open_clip")
    import open_clip

    from mmfast.models.clip.model import create_model, save_pretrained
    from mmfast.models.llava.vision import check_against_open_clip

    clip = create_model("tiny", device="cpu", kernels=False)
    save_pretrained(clip.state_dict(), tmp_path / "clip", model_cfg=clip.mmfast_config["model_cfg"],
                    preprocess_cfg=open_clip.model.get_model_preprocess_cfg(clip))
    torch.manual_seed(0)
    assert check_against_open_clip(tmp_path / "clip", torch.randn(2, 3, 32, 32)) < 1e-5
    llava = ml.build_llava(str(tmp_path / "clip"), llm="tiny", kernels=False, seed=0)
    ref = clip.visual.conv1.weight
    assert torch.equal(llava.model.model.vision_tower.embeddings.patch_embedding.weight, ref)
    assert llava.template == "vicuna_v1" and llava.tokenizer.convert_tokens_to_ids("<image>") == llava.config.image_token_id


def test_chat_one_shot(tmp_path, tiny, capsys):
    from mmfast.models.chat import main

    tiny.save_pretrained(tmp_path / "m")
    _image().save(tmp_path / "x.png")
    rc = main(["--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--prompt", "What is it?",
               "--max-new-tokens", "3", "--device", "cpu"])
    assert rc == 0
    expected = tiny.answer([_image()], ["What is it?"], max_new_tokens=3)[0]
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected  # (a DeepSpeed import may log first)
    assert main(["--model", str(tmp_path / "nope")]) == 2


def test_patched_generation_equals_plain(tiny):
    """KV-cache decoding through mmfast attention (left padding packed out) gives the same tokens."""
    fast = ml.build_llava("tiny", kernels=True, seed=0)
    images = [_image(), None]
    prompts = [tiny.prompt("What is it?"), tiny.prompt("Hello there, how are you?", with_image=False)]
    assert fast.generate(images, prompts, max_new_tokens=6) == tiny.generate(images, prompts, max_new_tokens=6)

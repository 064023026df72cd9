"""Regressions found by running transformers' own model tests (LLaMA, CLIP, LLaVA) with
``attn_implementation="mmfast"`` and with ``mmfast.patch`` (see docs/transformers_model_tests.md)."""
import copy

import pytest
import torch

import mmfast
from mmfast.testing import assert_error_bound

transformers = pytest.importorskip("transformers")


def _tiny_llama_lm():
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_fused_loss_output_keeps_loss_first():
    """The fused linear-cross-entropy rule (training mode) returns the loss in the position transformers
    gives it: first in the ModelOutput (keys, ``to_tuple()``, integer indexing), as with ``return_dict=False``."""
    model = _tiny_llama_lm().train()  # no dropout in this config: train mode changes no value
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids)
        ref64 = copy.deepcopy(model).double()(input_ids=ids, labels=ids)
    mmfast.patch(model, kinds=("loss",))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
            tup = model(input_ids=ids, labels=ids, return_dict=False)
        assert next(iter(out.keys())) == "loss"
        assert list(out.keys()) == list(ref.keys())
        assert out[0] is out.loss and out.to_tuple()[0] is out.loss
        assert len(out.to_tuple()) == len(tup)
        torch.testing.assert_close(tup[0], out.loss)
        # the value: fp64 unpatched = reference, fp32 unpatched = PyTorch's own error
        assert_error_bound(out.loss, ref64.loss, ref.loss, name="loss")
        assert out.logits.shape == (3, 9, 0) and tup[1].shape == (3, 9, 0)
    finally:
        mmfast.unpatch(model)


def _tiny_clip():
    text = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    torch.manual_seed(0)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=24)).eval()


def test_clip_heads_rule_honours_return_dict_false():
    """The CLIP heads rule returns a tuple when ``return_dict=False`` is passed, laid out as the unpatched
    model's (loss, logits_per_image, logits_per_text, text_embeds, image_embeds, towers' tuples)."""
    model = _tiny_clip()
    g = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(0, 50, (3, 7), generator=g), "pixel_values": torch.randn(3, 3, 16, 16, generator=g),
              "return_loss": True, "return_dict": False}
    with torch.no_grad():
        ref = model(**inputs)
        ref64 = copy.deepcopy(model).double()(**{k: (v.double() if k == "pixel_values" else v)
                                                  for k, v in inputs.items()})
    from mmfast.models.patch.projection import hf_clip_towers_carry_projections

    mmfast.patch(model, kinds=("projection",))
    try:
        carried = hf_clip_towers_carry_projections()
        assert ("clip.linear_l2_normalize" in mmfast.models.patch.patched_rules(model)) != carried
        with torch.no_grad():
            out = model(**inputs)
            full = model(**{**inputs, "return_dict": True})
        if carried:  # transformers 5: the towers' pooler_output is the projected features, as unpatched
            assert full.text_model_output.pooler_output.shape == (3, 24)
            assert full.vision_model_output.pooler_output.shape == (3, 24)
        assert isinstance(ref, tuple) and isinstance(out, tuple)
        assert len(out) == len(ref)
        assert [type(o) for o in out] == [type(r) for r in ref]
        for i, name in enumerate(("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds")):
            assert out[i].shape == ref[i].shape, name
            assert_error_bound(out[i], ref64[i], ref[i], name=name)
    finally:
        mmfast.unpatch(model)


def _checkpointed_calls(model, ids):
    """Forward + backward in training mode with gradient checkpointing on; returns how many decoder-layer
    calls went through the layers' checkpoint function."""
    calls = []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func

        def counting(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    model(input_ids=ids, labels=ids).loss.backward()
    return len(calls)


def test_decoder_layer_rule_keeps_gradient_checkpointing():
    """transformers' test_training_gradient_checkpointing under mmfast.patch: the decoder layers still run
    through their checkpoint function after the norm rules are applied."""
    model = _tiny_llama_lm().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(3))
    assert _checkpointed_calls(model, ids) == len(model.model.layers)
    mmfast.patch(model, kinds=("norm",))
    try:
        if "llama.decoder_layer_add_rms_norm" not in mmfast.models.patch.patched_rules(model):
            pytest.skip("the LLaMA decoder-layer rule is not registered in this checkout")
        assert _checkpointed_calls(model, ids) == len(model.model.layers)
    finally:
        mmfast.unpatch(model)

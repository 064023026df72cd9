"""mmfast.models.nextgpt (tiny preset): encoders, projections, signal tokens, stages' trainable sets,
tiny diffusers decoders, save/load, generation and the evaluation adapter contract."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from mmfast.models.nextgpt import data as nd
from mmfast.models.nextgpt import decoders as ndec
from mmfast.models.nextgpt import model as ng
from mmfast.testing import favoured_token


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return ng.build_nextgpt("tiny", seed=0, kernels=False)


def _batch(m: ng.NextGPT, with_media=True, seed=0):
    """Two dialogues: image in -> text + audio signal run; text -> image signal run."""
    g = torch.Generator().manual_seed(seed)
    recs = [
        {"conversations": [{"from": "human", "value": "<image>\nWhat is it? <video>"},
                           {"from": "gpt", "value": "a red cat. " + nd.signal_run("audio")}],
         "media": {"image": ["a"], "video": ["v"]}, "targets": {"audio": ["the sound of a cat"]}},
        {"conversations": [{"from": "human", "value": "Draw a blue dog. <audio>"},
                           {"from": "gpt", "value": "Here is the image. " + nd.signal_run("image")}],
         "media": {"audio": ["x"]}, "targets": {"image": ["a blue dog"]}},
    ]
    items = []
    for r in recs:
        nd.validate_record(r)
        it = nd.tokenize_dialogue(r, m.tokenizer, m.n_input_tokens)
        it["media"] = {"image": [torch.randn(3, 32, 32, generator=g)]} if "image" in r["media"] else {}
        if "video" in r["media"]:
            it["media"]["video"] = [torch.randn(5, 3, 32, 32, generator=g)]
        if "audio" in r["media"]:
            it["media"]["audio"] = [torch.randn(16000, generator=g) * 0.3]
        it["captions"] = r["targets"]
        items.append(it)
    return nd.collate(items, m.tokenizer.pad_token_id)


def test_signal_tokens_are_single_added_tokens(model):
    tok = model.tokenizer
    assert [len(v) for v in nd.SIGNAL_TOKENS.values()] == [4, 24, 8]
    assert nd.SIGNAL_TOKENS["image"][0] == "[IMG0]" and nd.SIGNAL_TOKENS["video"][-1] == "[VID23]"
    for m in nd.MODALITIES:
        ids = tok(nd.signal_run(m), add_special_tokens=False)["input_ids"]
        assert ids == model.signal_ids[m]
        # The run swallows the space before it: no lone space token between a reply's text and its run.
        assert tok(" " + nd.signal_run(m), add_special_tokens=False)["input_ids"] == ids
        assert tok("Here. " + nd.signal_run(m), add_special_tokens=False)["input_ids"][-len(ids) - 1:] == \
            tok("Here.", add_special_tokens=False)["input_ids"][-1:] + ids
        assert min(ids) >= model.base_vocab
    assert model.llm.get_input_embeddings().num_embeddings == len(tok)
    assert model.llm.get_output_embeddings().weight.shape[0] == len(tok)


def test_encoders_shapes_and_errors(model):
    enc = model.encoders
    out = enc["image"](torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 16, 64) and out.pooled.shape == (2, 64)
    v = enc["video"](torch.randn(2, 7, 3, 32, 32))
    assert v.tokens.shape == (2, 16, 64) and v.pooled.shape == (2, 64)
    # Video = mean over the sampled frames of the image encoder: a static clip equals its frame.
    frame = torch.randn(1, 3, 32, 32)
    still = enc["video"](frame.unsqueeze(1).expand(1, 4, 3, 32, 32).contiguous())
    torch.testing.assert_close(still.pooled, enc["image"](frame).pooled, rtol=1e-5, atol=1e-5)
    wave = torch.randn(2, 16000) * 0.3
    a = enc["audio"](wave)
    assert a.tokens.shape[0] == 2 and a.tokens.shape[2] == 64 and a.pooled.shape == (2, 64)
    assert torch.isfinite(a.tokens).all()
    # AST sees its own feature extractor's Kaldi fbank: (N, max_length frames, mel bins), AudioSet-normalised.
    from transformers import ASTFeatureExtractor

    feats = enc["audio"].features(wave)
    assert feats.shape == (2, 64, 32)
    fe = ASTFeatureExtractor(num_mel_bins=32, max_length=64)
    torch.testing.assert_close(feats[1], fe(wave[1].numpy(), sampling_rate=16000, return_tensors="pt")["input_values"][0])
    with pytest.raises(ValueError, match="mel bins"):
        type(enc["audio"])(enc["audio"].model, feature_extractor=ASTFeatureExtractor(num_mel_bins=128, max_length=64))
    with pytest.raises(ValueError, match="images must be"):
        enc["image"](torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="videos must be"):
        enc["video"](torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="audio must be"):
        enc["audio"](torch.randn(2, 1, 16000))


def test_output_projection_shapes_match_each_decoder(model):
    h = model.llm.config.hidden_size
    for m in nd.MODALITIES:
        pipe = model.pipes[m]
        n = len(model.signal_ids[m])
        pred = model.output_proj[m](torch.randn(3, n, h))
        target = ndec.text_condition(m, pipe, ["a red cat", "two dogs", "a bell"])
        assert pred.shape == target.shape, m
        if m == "audio":  # AudioLDM: pooled CLAP vector -> the UNet's class embedding input
            assert pred.shape == (3, 1, pipe.unet.config.projection_class_embeddings_input_dim)
        else:
            assert pred.shape == (3, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)


def test_tiny_pipelines_produce_finite_media(model):
    shapes = {"image": (1, 32, 32, 3), "video": (1, 4, 16, 16, 3)}
    for m in nd.MODALITIES:
        cond = model.output_proj[m](torch.randn(1, len(model.signal_ids[m]), model.llm.config.hidden_size))
        out = torch.as_tensor(ndec.decode(m, model.pipes[m], cond.detach(), steps=2))
        assert torch.isfinite(out).all(), m
        if m in shapes:
            assert tuple(out.shape) == shapes[m]
            assert 0 <= float(out.min()) and float(out.max()) <= 1
        else:
            assert out.dim() == 2 and out.shape[0] == 1 and out.shape[1] >= 1000  # 0.5 s at 16 kHz


def test_loss_parts_and_errors(model):
    batch = _batch(model)
    out = model.loss(batch)
    assert set(out) == {"lm", "lm_signal", "align_audio", "align_image", "loss"}
    assert not out["lm_signal"].requires_grad  # logged only: the signal tokens' share of the LM loss
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["lm"] + out["align_audio"] + out["align_image"])
    bad = dict(batch, media={k: v for k, v in batch["media"].items() if k != "image"})
    with pytest.raises(ValueError, match="<image> tokens but no image inputs"):
        model.loss(bad)
    bad = dict(batch, captions={"audio": ["x", "y"], "image": ["z"]})
    with pytest.raises(ValueError, match="signal-token runs but 2 target captions"):
        model.loss(bad)


def _step(model, stage, batch, modalities=nd.MODALITIES):
    names = set(model.set_stage(stage, modalities))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.loss(batch)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return names, changed, before, after


def test_stage2_trains_the_chosen_rows_and_projections():
    """set_stage(2, rows=, projections=): only the audio signal tokens' rows and the audio output projection
    move, while the image records' losses still flow (they teach the audio rows when not to start)."""
    torch.set_num_threads(1)
    m = ng.build_nextgpt("tiny", seed=0, kernels=False)
    batch = _batch(m)
    names = set(m.set_stage(2, nd.MODALITIES, rows=("audio",), projections=("audio",)))
    assert {n for n in names if not n.startswith("output_proj.audio.")} == {"llm.model.embed_tokens.weight",
                                                                            "llm.lm_head.weight"}
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    m.loss(batch)["loss"].backward()
    opt.step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    emb_key, head_key = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
    assert changed == {k for k in before if k.startswith("output_proj.audio.")} | {emb_key, head_key}
    aud = m.signal_ids["audio"]
    others = [i for i in range(before[emb_key].shape[0]) if i not in aud]
    for k in (emb_key, head_key):
        assert torch.equal(before[k][others], after[k][others]), f"{k}: a row outside [AUD*] changed"
        assert not torch.equal(before[k][aud], after[k][aud])
    assert set(m.set_stage(2, ("image",), rows=(), projections=("image",))) == {
        k for k, _ in m.named_parameters() if k.startswith("output_proj.image.")}
    # head_rows: the LM-head rows alone (when a run opens), no embedding row (the states the projections read)
    names = set(m.set_stage(2, nd.MODALITIES, rows=(), head_rows=("image", "audio"), projections=("audio",)))
    assert {n for n in names if not n.startswith("output_proj.audio.")} == {head_key}
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    m.loss(batch)["loss"].backward()
    opt.step()
    after = m.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {
        k for k in before if k.startswith("output_proj.audio.")} | {head_key}
    sig = m.signal_ids["image"] + m.signal_ids["audio"]
    rest = [i for i in range(before[head_key].shape[0]) if i not in sig]
    assert torch.equal(before[head_key][rest], after[head_key][rest])
    assert not torch.equal(before[head_key][m.signal_ids["image"]], after[head_key][m.signal_ids["image"]])
    with pytest.raises(ValueError, match="only stage 2 trains signal-token rows, not stage 1"):
        m.set_stage(1, head_rows=("audio",))
    with pytest.raises(ValueError, match="rows, head_rows: only stage 2"):
        m.set_stage(3, rows=("audio",))
    with pytest.raises(ValueError, match="stage 1 trains no output projection"):
        m.set_stage(1, projections=("audio",))
    with pytest.raises(ValueError, match="projections \\['sound'\\]"):
        m.set_stage(2, projections=("sound",))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_only_the_stages_parameters_change(stage):
    torch.set_num_threads(1)
    m = ng.build_nextgpt("tiny", seed=0, kernels=False)
    batch = _batch(m)
    _, changed, before, after = _step(m, stage, batch)
    assert changed, "nothing trained"
    emb_key, head_key = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
    allowed = {"1": ("input_proj.",), "2": ("output_proj.",), "3": ("input_proj.", "output_proj.")}[str(stage)]
    for k in changed:
        ok = k.startswith(allowed) or (stage == 3 and "lora_" in k) or (stage == 2 and k in (emb_key, head_key))
        assert ok, f"stage {stage} changed {k}"
    # Encoders, LLM base (incl. LoRA's base layers) and decoders stay bit-identical.
    for k in before:
        if k.startswith(("encoders.", "decoders.")) or (k.startswith("llm.") and "lora_" not in k
                                                          and k not in (emb_key, head_key)):
            assert torch.equal(before[k], after[k]), k
    old = [i for i in range(before[emb_key].shape[0]) if i not in m.new_ids]
    for k in (emb_key, head_key):
        assert torch.equal(before[k][old], after[k][old]), f"{k}: a pre-existing row changed"
    if stage == 2:
        sig = m.signal_ids["image"] + m.signal_ids["audio"]
        assert not torch.equal(before[emb_key][sig], after[emb_key][sig])
    if stage == 3:
        assert any("lora_B" in k for k in changed)
        assert not any(k in changed for k in (emb_key, head_key))


def test_group_projection_makes_concept_tokens():
    torch.set_num_threads(1)
    m = ng.build_nextgpt("tiny", input_projection="group", seed=0, kernels=False)
    assert m.n_input_tokens == 4
    batch = _batch(m)
    n_img = int((batch["input_ids"] == m.placeholder_ids["image"]).sum())
    assert n_img == 4
    assert torch.isfinite(m.loss(batch)["loss"])


def test_save_load_reproduces_outputs(tmp_path):
    torch.set_num_threads(1)
    m = ng.build_nextgpt("tiny", seed=3, kernels=False)
    batch = _batch(m, seed=1)
    _step(m, 2, batch)
    _step(m, 3, batch)  # LoRA + projections trained, signal rows trained
    m.eval()
    with torch.no_grad():
        ref = m.loss(batch)
        ref_cond = m.output_proj["image"](torch.ones(1, 4, m.llm.config.hidden_size))
    m.save_pretrained(tmp_path / "ng")
    import json

    cfg = json.loads((tmp_path / "ng" / "config.json").read_text())
    assert cfg["mmfast_model"] == "nextgpt" and cfg["lora_config"]["r"] == 8
    back = ng.load_pretrained(tmp_path / "ng", device="cpu")
    with torch.no_grad():
        got = back.loss(batch)
        cond = back.output_proj["image"](torch.ones(1, 4, back.llm.config.hidden_size))
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert torch.equal(ref_cond, cond)
    from mmfast.eval.adapters import detect_kind

    assert detect_kind(tmp_path / "ng") == "nextgpt"
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        ng.load_pretrained(tmp_path / "nothing")


def test_generate_decodes_signal_runs_to_files(model, tmp_path):
    from PIL import Image

    for m, suffix in (("image", ".png"), ("audio", ".wav"), ("video", ".gif")):
        # Force the first signal token: a bias on its logit (the rest of the run is appended).
        with favoured_token(model.llm, model.signal_ids[m][0]):
            r = model.generate("Make something.", images=[torch.randn(3, 32, 32)],
                               max_new_tokens=len(model.signal_ids[m]), out_dir=tmp_path, steps=2)
        assert r["token_ids"] == model.signal_ids[m]
        assert r["conditions"][m].shape[0] == 1
        (path,) = r[m]
        assert path.endswith(suffix)
        if m == "image":
            assert Image.open(path).size == (32, 32)
    # A run's later tokens never start a step on their own, however high their logit.
    with favoured_token(model.llm, model.signal_ids["image"][1]):
        r = model.generate("Make something.", max_new_tokens=3, decode=False)
    assert model.signal_ids["image"][1] not in r["token_ids"]


def test_answer_contract(model):
    out = model.answer([None, torch.randn(3, 32, 32)], ["Is there a cat?", "What is it?"], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(x, str) for x in out)
    with pytest.raises(ValueError, match="pair one to one"):
        model.answer([None], ["a", "b"])


@pytest.fixture(scope="module")
def patched(model):
    # the reference kernels: the engine's path is under test here, not the interpreter's speed
    fast = ng.build_nextgpt("tiny", seed=0, kernels=True, backend="reference")
    fast.load_state_dict(model.state_dict())
    return fast


def test_paged_engine_decodes_the_dynamic_cache_tokens(patched):
    """On a patched LLM generate/answer go through the batched paged engine (cache="auto"): token for token what
    the one-request DynamicCache loop gives, signal runs included (a run begun on the last allowed token is
    finished, its tail forced one token per step)."""
    from mmfast.models.nextgpt.generate import _cache

    assert _cache(patched, "auto") == "paged"
    imgs = [None, torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1)), None]
    qs = ["Is there a cat?", "What is it?", "Draw a red dog."]
    want = [patched.generate(q, images=None if i is None else [i], max_new_tokens=9, decode=False, cache="dynamic")
            for i, q in zip(imgs, qs)]
    got = [patched.generate(q, images=None if i is None else [i], max_new_tokens=9, decode=False, cache="paged")
           for i, q in zip(imgs, qs)]
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert all(len(w["token_ids"]) > 0 for w in want)
    assert patched.answer(imgs, qs, max_new_tokens=9) == [w["text"] for w in want]
    with favoured_token(patched.llm, patched.signal_ids["image"][0]):
        for cache in ("dynamic", "paged"):
            r = patched.generate("Draw.", max_new_tokens=1, decode=False, cache=cache)
            assert r["token_ids"] == patched.signal_ids["image"], cache
            assert r["conditions"]["image"].shape[0] == 1


def test_paged_cache_needs_a_patched_llm(model):
    with pytest.raises(ValueError, match="patched with mmfast attention"):
        model.generate("Hi.", max_new_tokens=2, decode=False, cache="paged")
    with pytest.raises(ValueError, match="cache must be one of"):
        model.answer([None], ["Hi."], cache="static")


def test_image_encoder_from_an_open_clip_export(tmp_path):
    """The demo's CLIP (an open_clip export) becomes the image/video encoder: every ViT weight must fit."""
    from mmfast.models.clip.model import create_model, save_pretrained
    from mmfast.models.nextgpt import encoders as nenc

    clip = create_model("tiny", device="cpu", kernels=False)
    save_pretrained(clip, tmp_path / "clip")
    enc = nenc.ImageEncoder.from_pretrained(tmp_path / "clip")
    w = clip.visual.conv1.weight
    assert torch.equal(enc.model.get_input_embeddings().weight, w)
    out = enc(torch.randn(2, 3, enc.image_size, enc.image_size))
    assert out.tokens.shape[:2] == (2, (enc.image_size // w.shape[-1]) ** 2) and torch.isfinite(out.pooled).all()
    with pytest.raises(FileNotFoundError, match="image encoder directory"):
        nenc.ImageEncoder.from_pretrained(tmp_path / "missing")


def test_touch_all_gives_every_trainable_parameter_a_gradient():
    """Data-parallel ranks must reduce the same gradients whatever modalities their batch holds."""
    torch.set_num_threads(1)
    m = ng.build_nextgpt("tiny", seed=0, kernels=False)
    m.set_stage(3)
    batch = _batch(m)
    batch = dict(batch, input_ids=batch["input_ids"][1:], labels=batch["labels"][1:],
                 attention_mask=batch["attention_mask"][1:], media={"audio": batch["media"]["audio"]},
                 captions={"image": batch["captions"]["image"]})
    out = m.loss(batch, touch_all=True)
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert float(m.output_proj["video"].out.weight.grad.abs().max()) == 0.0  # zero-weighted: no effect


def test_llm_from_a_llava_directory(tmp_path):
    from mmfast.models.llava.model import build_llava

    lv = build_llava("tiny", kernels=False, seed=0)
    lv.save_pretrained(tmp_path / "llava")
    m = ng.build_nextgpt("tiny", llm=tmp_path / "llava", seed=1, kernels=False)
    src = lv.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(m.llm.model.layers[0].self_attn.q_proj.weight, src)
    n = lv.model.lm_head.weight.shape[0]
    assert torch.equal(m.llm.lm_head.weight[:n], lv.model.lm_head.weight)
    assert m.tokenizer.convert_tokens_to_ids("[IMG0]") >= n


def test_kernels_patch_the_llm_and_agree_with_plain(model):
    """kernels=True: mmfast.patch on the LLM (attention, RMSNorm, fused linear cross-entropy) gives the
    same losses as plain transformers, in fp32."""
    from mmfast.models.patch import patched_rules

    fast = ng.build_nextgpt("tiny", seed=0, kernels=True)
    assert {"hf.attention", "hf.rms_norm"} <= set(patched_rules(fast.llm))
    fast.load_state_dict(model.state_dict())
    batch = _batch(model)
    with torch.no_grad():
        ref, got = model.loss(batch), fast.loss(batch)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=k)


def test_mmfast_chat_routes_a_nextgpt_directory(model, tmp_path, capsys):
    from mmfast.models.chat import main as chat_main

    model.save_pretrained(tmp_path / "ng")
    rc = chat_main(["--model", str(tmp_path / "ng"), "--prompt", "Hello", "--max-new-tokens", "3",
                    "--out-dir", str(tmp_path / "gen"), "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")  # one reply printed (a random tiny LLM may say little)
    rc = chat_main(["--model", str(tmp_path / "ng"), "--prompt", "x", "--image", str(tmp_path / "missing.png")])
    assert rc == 2


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_optional_diffusion_loss_trains_the_output_projection(model, modality):
    """Noise-prediction loss through each frozen tiny decoder: finite, its gradient reaches the output
    projection (and nothing else), the decoder's weights stay bit-identical after an optimizer step."""
    g = torch.Generator().manual_seed(1)
    rec = {"conversations": [{"from": "human", "value": "Make one."},
                             {"from": "gpt", "value": nd.signal_run(modality)}], "targets": {modality: ["a red cat"]}}
    batch = nd.collate([{**nd.tokenize_dialogue(rec, model.tokenizer, model.n_input_tokens), "media": {},
                         "captions": rec["targets"]}], model.tokenizer.pad_token_id)
    model.set_stage(2, (modality,))
    with pytest.raises(ValueError, match=f"target_media'\\]\\['{modality}'"):
        model.loss(batch, diffusion_weight=1.0)
    target = {"image": lambda: torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
              "video": lambda: torch.rand(1, 4, 3, 16, 16, generator=g) * 2 - 1,
              "audio": lambda: torch.randn(1, 4000, generator=g) * 0.3}[modality]()
    batch["target_media"] = {modality: target}
    before = {k: v.clone() for k, v in model.decoders[modality].state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model.loss(batch, diffusion_weight=1.0)
    d = out[f"diffusion_{modality}"]
    assert torch.isfinite(d) and float(d) > 0
    model.zero_grad(set_to_none=True)
    d.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().max()) > 0}
    emb = "llm.model.embed_tokens.weight"  # the signal tokens' input embeddings feed the projection too
    assert f"output_proj.{modality}.out.weight" in grads
    assert all(n.startswith(f"output_proj.{modality}.") or n == emb for n in grads), sorted(grads)[:5]
    rows = model.llm.get_input_embeddings().weight.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert set(rows) <= set(model.signal_ids[modality])
    opt.step()
    model.zero_grad(set_to_none=True)
    after = model.decoders[modality].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="one per signal run"):
        ndec.diffusion_loss(modality, model.pipes[modality], out["align_" + modality].new_zeros(2, 1, 1), target)
    model.set_stage(1)



def _reply_start_logp(m, batch):
    """log p([IMG0]) where each reply starts (B,), and the mean NLL of the supervised signal tokens."""
    with torch.no_grad():
        hidden, _ = m.hidden(batch["input_ids"], batch["attention_mask"], batch["media"])
        logp = m.llm.lm_head(hidden[:, :-1]).float().log_softmax(-1)  # (B, L-1, V)
    target = batch["labels"][:, 1:]
    first = (target != nd.IGNORE_INDEX).int().argmax(1)  # (B,)
    start = logp[torch.arange(len(first)), first, m.signal_ids["image"][0]]
    sig = torch.isin(target, torch.tensor(m.signal_ids["image"]))
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[sig].mean()
    return start, float(nll)


def test_stage2_teaches_the_llm_to_start_signal_runs(tmp_path):
    """Stage 2 on a world's text->image pairs: the [IMG0] row learns to open the reply to an image request
    (and less so a captioning reply, the stage's negatives); only the output projection and the added
    tokens' rows change."""
    from mmfast.data.synthetic import make_world
    from mmfast.models.llava.data import ImageProcessor

    torch.set_num_threads(1)
    make_world(tmp_path, 12, 32, seed=0, media=False)
    m = ng.build_nextgpt("tiny", seed=0, kernels=False)
    recs = nd.stage_records(tmp_path, 2, ("image",), negatives=0.5)
    assert any("media" in r for r in recs) and all(r["conversations"][1]["value"] == nd.signal_run("image")
                                                   for r in recs if "targets" in r)
    ds = nd.DialogueDataset(recs, m.tokenizer, nd.MediaLoader(tmp_path, ImageProcessor(32, aspect="resize")),
                            m.n_input_tokens)
    batch = nd.collate([ds[i] for i in range(len(ds))], m.tokenizer.pad_token_id)
    asks = torch.isin(batch["input_ids"], torch.tensor(m.signal_ids["image"])).any(1)  # (B,) text->image rows
    assert 0 < int((~asks).sum()) < int(asks.sum())
    start0, nll0 = _reply_start_logp(m, batch)
    names = m.set_stage(2, ("image",))
    assert {n for n in names if not n.startswith("output_proj.image.")} <= {"llm.model.embed_tokens.weight",
                                                                            "llm.lm_head.weight"}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rows = [m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight]
    opt = torch.optim.AdamW([{"params": [p for p in m.output_proj["image"].parameters()]},
                             {"params": rows, "lr": 2e-2}], lr=2e-3, weight_decay=0.0)
    for _ in range(60):
        m.loss(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    start1, nll1 = _reply_start_logp(m, batch)
    assert nll1 < 0.5 * nll0, (nll0, nll1)
    with torch.no_grad():  # the logged lm_signal is the same quantity
        torch.testing.assert_close(m.loss(batch)["lm_signal"], torch.tensor(nll1))
    assert float(start1[asks].mean()) > float(start0[asks].mean()) + 2.0
    assert float(start1[asks].min()) > float(start1[~asks].max())  # image requests, not captioning, open a run
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    emb_head = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")
    assert changed == set(names) | set(emb_head), changed ^ (set(names) | set(emb_head))
    old = torch.ones(len(m.tokenizer), dtype=torch.bool)
    old[m.new_ids] = False
    for k in emb_head:
        assert torch.equal(before[k][old], after[k][old]), f"{k}: a pre-existing row changed"
    m.set_stage(1)


def test_bf16_stage2_step_as_the_gpu_trainer():
    """The GPU trainer's bf16 path on CPU: set_stage(2), then the whole module cast to bf16 (as DeepSpeed's
    bf16 engine does), bf16 media; the losses are reduced in fp32 and agree with the fp32 model's, every
    trainable parameter gets a finite bf16 gradient, the frozen ones none, old token rows stay at zero."""
    torch.set_num_threads(1)
    m = ng.build_nextgpt("tiny", seed=0, kernels=False)
    batch = _batch(m)
    m.set_stage(2)
    with torch.no_grad():
        ref = m.loss(batch, touch_all=True)
    m.to(torch.bfloat16)
    batch16 = dict(batch, media={k: v.to(torch.bfloat16) for k, v in batch["media"].items()},
                   target_media={"image": torch.rand(1, 3, 32, 32) * 2 - 1, "audio": torch.randn(1, 4000) * 0.3})
    out = m.loss(batch16, diffusion_weight=0.1, touch_all=True)
    assert set(out) == set(ref) | {"diffusion_image", "diffusion_audio"}
    for k in ("diffusion_image", "diffusion_audio"):  # random noise and timesteps: no fp32 twin to compare
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
    for k, want in ref.items():
        got = out[k] if k != "loss" else out[k] - 0.1 * (out["diffusion_image"] + out["diffusion_audio"])
        assert got.dtype == torch.float32 and torch.isfinite(got), k
        # Within one bf16 unit roundoff (2^-8) of the fp32 model: the reductions themselves run in fp32
        # (measured: <= 7e-4; an align loss reduced in bf16 was off by up to 2^-8 on its own).
        torch.testing.assert_close(got, want, rtol=2**-8, atol=0, msg=k)
    out["loss"].backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    old = torch.ones(len(m.tokenizer), dtype=torch.bool)
    old[m.new_ids] = False
    for w in (m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight):
        assert float(w.grad[old].abs().max()) == 0.0 and float(w.grad[~old].abs().max()) > 0


def test_demo_eval_draws_through_the_decoder_and_nextgpt(model, tmp_path):
    """The demo's text->image stage: held-out prompts through the decoder alone and through NExT-GPT, and a
    sample grid holding exactly those images (no CLIP here: the scores are None, the images are checked)."""
    import argparse

    import numpy as np
    from PIL import Image

    from mmfast.data._media import write_audio, write_videos
    from mmfast.data.media import read_wav
    from mmfast.data.synthetic import make_world
    from mmfast.demo import DemoContext
    from mmfast.eval.t2a import AudioJudge, load_clips
    from mmfast.eval.t2i import generate, heldout_prompts
    from mmfast.models.nextgpt import decoders as nd
    from mmfast.models.nextgpt.demo import nextgpt_eval

    ctx = DemoContext(tmp_path, argparse.Namespace(nextgpt_eval_prompts=2, nextgpt_emit_prompts=1, seed=0,
                                                   nextgpt_guidance=3.0, nextgpt_diffusion_steps=2,
                                                   nextgpt_audio_guidance=2.0, nextgpt_video_guidance=2.0,
                                                   nextgpt_video_prompts=3))
    make_world(ctx.world, 24, 32, 1, media=False)
    write_audio(ctx.world, 1, 2)  # 1 train and 1 held-out clip per class
    write_videos(ctx.world, 1, 32, 40)  # 32 train and 8 held-out videos of 4 frames
    model.save_pretrained(tmp_path / "nextgpt_stage2_video" / "final")  # the last stage-2 run: the world has videos
    out = nextgpt_eval(ctx)
    rows = heldout_prompts(ctx.world, 2)
    assert out["nextgpt_eval_prompts"] == len(rows) == 2 and out["nextgpt_image_decoder"] == "shipped:image"
    assert out["nextgpt_t2i_top1"] is None  # no demo CLIP in this folder
    alone = generate(model.pipes["image"], [r[1] for r in rows], seed=0, steps=2, guidance_scale=3.0, batch_size=2)
    grid = np.asarray(Image.open(tmp_path / "nextgpt_samples.png").convert("RGB"))
    assert grid.shape == (18 + 2 * (128 + 4), 360 + 2 * (128 + 4), 3)
    for r in range(2):
        want = np.asarray(Image.fromarray((alone[r].numpy() * 255).round().astype(np.uint8)).resize((128, 128),
                                                                                                     Image.NEAREST))
        y = 18 + r * 132
        assert np.array_equal(grid[y:y + 128, 360:360 + 128], want), r
        assert not np.array_equal(grid[y:y + 128, 492:492 + 128], want)  # the NExT-GPT column: another image
    # text->audio: the held-out clips' captions through the decoder alone and through NExT-GPT, judged by the
    # classifier of the real train clips; the clips written are the ones judged
    waves, labels, captions = load_clips(ctx.world, "val")
    assert out["nextgpt_t2a_prompts"] == 16 and out["nextgpt_audio_decoder"] == str(model.cfg["decoders"]["audio"])
    pipe = model.pipes["audio"]
    alone = torch.as_tensor(nd.decode("audio", pipe, nd.text_condition("audio", pipe, captions), steps=2, seed=0,
                                      guidance_scale=2.0, audio_length_in_s=1.0))
    judge = AudioJudge.fit(ctx.world)
    assert out["nextgpt_t2a_top1_decoder"] == round(judge.accuracy(alone, labels), 4)
    assert out["nextgpt_t2a_real_top1"] == round(judge.accuracy(waves, labels), 4)
    for i in (0, 15):
        dec, _ = read_wav(tmp_path / "nextgpt_samples_audio" / f"{i:02d}_decoder.wav")
        ng, _ = read_wav(tmp_path / "nextgpt_samples_audio" / f"{i:02d}_nextgpt.wav")
        assert np.abs(np.asarray(dec) - alone[i].numpy()).max() <= 1 / 32767 + 1e-6  # 16-bit PCM of that clip
        assert np.abs(np.asarray(ng) - alone[i].numpy()).max() > 1e-3
    # text->video: the first held-out single movers' captions, judged per frame and by their motion; the GIFs
    # written are the ones judged
    from mmfast.eval.t2v import FrameJudge, as_gifs, judge, load_video, load_videos

    real, captions, movers = (x[:3] for x in load_videos(ctx.world, "val"))
    assert out["nextgpt_t2v_prompts"] == 3 and out["nextgpt_video_decoder"] == str(model.cfg["decoders"]["video"])
    pipe = model.pipes["video"]
    alone = as_gifs(nd.decode("video", pipe, nd.text_condition("video", pipe, captions), steps=2, seed=0,
                              guidance_scale=2.0, num_frames=4))
    frames = FrameJudge.fit(ctx.world, seed=0)
    want = judge(frames, alone, movers)
    assert out["nextgpt_t2v_top1_decoder"] == round(want["top1"], 4)
    assert out["nextgpt_t2v_direction_acc_decoder"] == round(want["direction_acc"], 4)
    assert out["nextgpt_t2v_real_direction_acc"] == 1.0
    assert out["nextgpt_t2v_real_top1"] == round(judge(frames, real, movers)["top1"], 4)
    gifs = sorted((tmp_path / "nextgpt_samples_video").glob("*.gif"))
    assert len(gifs) == 6 and gifs[0].name == f"00_{movers[0][0][0]}_{movers[0][0][1].replace(' ', '_')}_decoder.gif"
    assert np.array_equal(load_video(gifs[0]), alone[0])
    assert not np.array_equal(load_video(gifs[1]), alone[0])  # NExT-GPT's: another clip


def test_audio_emit_rate_counts_replies_opening_an_audio_run():
    from mmfast.models.nextgpt import data as nd
    from mmfast.models.nextgpt.demo import audio_emit_rate

    class Stub:
        def __init__(self):
            self.signal_ids, self.asked = {"audio": [900, 901], "image": [800, 801]}, []

        def generate(self, q, max_new_tokens, decode, audios=None):
            self.asked.append((q, audios))
            if audios:  # captioning: the first clip's reply opens an image run, the others none
                return {"token_ids": [5, 800] if audios[0].endswith("a.wav") else [5, 6, 901]}
            return {"token_ids": [5, 900, 901] if "cup" in q else [5, 6, 900 + 1]}  # [AUD1] alone does not count

    pairs = [{"caption": "the sound of a cup", "path": "a.wav"}, {"caption": "the sound of a car", "path": "b.wav"},
             {"caption": "a cup again", "path": "c.wav"}, {"caption": "a tree", "path": "d.wav"}]
    stub = Stub()
    out = audio_emit_rate(stub, "W", pairs)
    assert out == {"nextgpt_signal_emit_rate_audio": 0.5, "nextgpt_signal_emit_rate_captioning_audio": 0.25,
                   "nextgpt_emit_prompts_audio": 4}
    t2x, x2t = nd.T2X_PROMPTS["audio"], nd.X2T_PROMPTS["audio"]
    want = [[(t2x[i % len(t2x)].format(c=p["caption"]), None), (x2t[i % len(x2t)], [str(Path("W") / p["path"])])]
            for i, p in enumerate(pairs)]
    assert stub.asked == [x for pair in want for x in pair]


def test_demo_stage2_chain_follows_the_worlds_media(tmp_path):
    # each stage-2 run starts from the one before and the last is evaluated, whatever an older demo left in --out
    import argparse

    from mmfast.demo import DemoContext
    from mmfast.models.nextgpt.demo import _stage2_chain

    ctx = DemoContext(tmp_path, argparse.Namespace())
    ctx.world.mkdir(parents=True)
    (tmp_path / "nextgpt_stage2_video" / "final").mkdir(parents=True)  # stale: this world has no videos
    names = lambda: [p.name for p in _stage2_chain(ctx)]
    assert names() == ["nextgpt_stage2"]
    (ctx.world / "t2x_audio.json").write_text("[]")
    assert names() == ["nextgpt_stage2", "nextgpt_stage2_audio"]
    (ctx.world / "t2x_video.json").write_text("[]")
    assert names() == ["nextgpt_stage2", "nextgpt_stage2_audio", "nextgpt_stage2_video"]


def test_demo_media_runs_train_their_projection_and_the_head_rows(tmp_path, monkeypatch):
    """The audio / video stage-2 runs: that projection, the LM-head rows of every signal so far, no embedding
    row; each medium's pairs repeated to about the image pairs' requests + negatives, with a share of negatives."""
    import argparse

    from mmfast.data.synthetic import make_world
    from mmfast.demo import DemoContext
    from mmfast.models.nextgpt import demo
    from mmfast.training.nextgpt import parse_args

    ctx = DemoContext(tmp_path, argparse.Namespace(nproc=2, nextgpt_batch_size=8, seed=0, nextgpt_steps2_audio=7,
                                                   nextgpt_steps2_video=5))
    make_world(ctx.world, 40, 32, seed=0, media=True, n_videos=3, audio_per_class=1)
    seen = []

    def fake_train(argv, out):
        seen.append(argv)
        return {"align_audio": 0.5, "align_video": 0.5, "seconds": 1.0,
                "first": {"align_audio": 1.0, "align_video": 1.0}}

    monkeypatch.setattr(demo, "_train", fake_train)
    demo._stage2_media(ctx, "audio", tmp_path / "nextgpt_stage2")
    demo._stage2_media(ctx, "video", tmp_path / "nextgpt_stage2_audio")
    n = {m: len(nd.t2x_pairs(ctx.world, m)) for m in nd.MODALITIES}
    for argv, mods in zip(seen, (("image", "audio"), ("image", "audio", "video")), strict=True):
        i = argv.index("--nproc")
        a = parse_args(argv[:i] + argv[i + 2:])
        assert a.modalities == mods and a.rows == () and a.head_rows == mods and a.projections == (mods[-1],)
        assert a.repeat == {m: max(1, round(2 * n["image"] / n[m])) for m in mods[1:]}
        assert a.negatives == {"image": 1.0, **{m: demo.MEDIA_NEGATIVES for m in mods[1:]}}
        assert a.init_from.endswith({"audio": "nextgpt_stage2/final", "video": "nextgpt_stage2_audio/final"}[mods[-1]])
        assert a.signal_lr > 0 and a.steps == {"audio": 7, "video": 5}[mods[-1]]


def test_output_projections_do_not_depend_on_how_the_decoders_are_built():
    # a decoder built at random draws from torch's generator, a shipped one does not: the output projections'
    # initial weights must not move with that (they moved the demo's NExT-GPT figures twice)
    cfg = ng.load_preset("tiny")
    tiny_video = {"latent_size": 4, "vae_channels": [8, 16], "unet_channels": [8, 16],
                  "text_encoder": {"hidden_size": 16, "layers": 1, "heads": 2, "max_length": 8}}
    other = {**cfg, "decoders": {**cfg["decoders"], "video": tiny_video}}
    a, b = (ng.build_nextgpt(c, seed=0, kernels=False) for c in (cfg, other))
    c = ng.build_nextgpt(cfg, seed=1, kernels=False)
    for m in ("image", "audio"):
        sa, sb, sc = (x.output_proj[m].state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), m
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), m  # still a function of the seed
    assert sum(p.numel() for p in b.pipes["video"].unet.parameters()) < sum(
        p.numel() for p in a.pipes["video"].unet.parameters())  # the decoders did differ


def test_two_turn_emit_rate_counts_second_replies_opening_the_asked_run(monkeypatch):
    """The model captions a held-out image, then is asked for a medium; only the second reply is counted, and
    only the asked modality's first signal token counts."""
    from mmfast.models.nextgpt import data as nd
    from mmfast.models.nextgpt.demo import two_turn_emit_rate

    images = [{"caption": f"img {i}", "path": f"images/val_{i}.png"} for i in range(3)]
    monkeypatch.setattr(nd, "t2x_pairs", lambda world, m, split: images if (m, split) == ("image", "val") else [])

    class Stub:
        def __init__(self):
            self.signal_ids, self.calls = {"audio": [900, 901], "image": [800, 801]}, []

        def generate(self, q, images=None, history=None, max_new_tokens=12, decode=True):
            self.calls.append((q, images, history))
            if history is None:  # the first turn: a caption that names a signal token does not count
                return {"text": f"caption of {images[0]} [IMG0]", "token_ids": [5, 800]}
            if "cup" in q:
                return {"token_ids": [5, 900, 901]}
            return {"token_ids": [5, 800] if "tree" in q else [5, 901]}  # another run; a later token alone

    pairs = [{"caption": "the sound of a cup", "path": "a.wav"}, {"caption": "a tree", "path": "b.wav"},
             {"caption": "a car", "path": "c.wav"}]
    stub = Stub()
    assert two_turn_emit_rate(stub, "W", pairs, "audio") == round(1 / 3, 3)
    assert two_turn_emit_rate(stub, "W", pairs, "image") == round(1 / 3, 3)  # only the tree request's [IMG0]
    tell, asks = nd.X2T_PROMPTS["image"][0], nd.T2X_PROMPTS["audio"]
    for i, (img, p) in enumerate(zip(images, pairs)):
        first, second = stub.calls[2 * i], stub.calls[2 * i + 1]
        path = [str(Path("W") / img["path"])]
        assert first == (tell, path, None)
        assert second == (asks[i % len(asks)].format(c=p["caption"]), path,
                          [{"from": "human", "value": "<image>\n" + tell},
                           {"from": "gpt", "value": f"caption of {path[0]} [IMG0]"}])


def test_demo_stage3_tunes_the_lora_after_the_last_stage2_run(tmp_path, monkeypatch):
    """Stage 3 starts from the last stage-2 run, trains the LoRA (no output projection) on the world's media,
    and is what nextgpt_eval measures; --nextgpt-steps3 0 skips it and the last stage-2 run is measured."""
    import argparse

    from mmfast.data.synthetic import make_world
    from mmfast.demo import DemoContext
    from mmfast.models.nextgpt import demo
    from mmfast.training.nextgpt import parse_args

    ctx = DemoContext(tmp_path, argparse.Namespace(nproc=2, nextgpt_batch_size=8, seed=0, nextgpt_steps3=9))
    make_world(ctx.world, 40, 32, seed=0, media=True, audio_per_class=1)
    seen = []

    def fake_train(argv, out):
        seen.append((argv, out))
        return {"loss": 2.0, "align_image": 1.5, "seconds": 1.0, "first": {"loss": 3.0}}

    monkeypatch.setattr(demo, "_train", fake_train)
    got = demo.nextgpt_stage3(ctx)
    assert got["nextgpt_stage3_steps"] == 9 and got["nextgpt_stage3_alignment_loss"] == 1.5
    (argv, out), = seen
    i = argv.index("--nproc")
    a = parse_args(argv[:i] + argv[i + 2:])
    assert a.stage == 3 and a.steps == 9 and a.lr == demo.STAGE3_LR and a.projections == ()
    assert a.mosit_share == demo.STAGE3_MOSIT_SHARE < 0.5
    mods = ("image", "audio", "video")
    assert a.modalities == mods and a.init_from == str(tmp_path / "nextgpt_stage2_video" / "final")
    n = {m: len(nd.t2x_pairs(ctx.world, m)) for m in mods}
    assert a.repeat == {m: max(1, round(2 * n["image"] / n[m])) for m in mods[1:]}
    assert a.negatives == {"image": 1.0, **{m: demo.MEDIA_NEGATIVES for m in mods[1:]}}
    assert out == tmp_path / "nextgpt_stage3" and demo._evaluated(ctx) == out
    ctx.args.nextgpt_steps3 = 0
    assert demo.nextgpt_stage3(ctx) == {"nextgpt_stage3_steps": 0} and len(seen) == 1
    assert demo._evaluated(ctx) == tmp_path / "nextgpt_stage2_video"

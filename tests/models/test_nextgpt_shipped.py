"""models/nextgpt/shipped.py: the trained tiny image decoder shipped in the package loads from safetensors (fp16
on disk), reproduces the held-out denoising loss recorded when it was shipped, is far better than the same
pipeline with a random UNet and text encoder, and samples deterministically per seed."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def shipped():
    from mmfast.models.nextgpt import shipped

    return shipped


@pytest.fixture(scope="module")
def pipe(shipped):
    return shipped.load("image")


@pytest.mark.parametrize("modality, parts", [("image", {"unet", "vae", "text_encoder"}),
                                             ("audio", {"unet", "vae", "text_encoder", "vocoder"})])
def test_shipped_files_are_fp16_safetensors(shipped, modality, parts):
    from safetensors.torch import load_file

    folder = shipped.pipeline_dir(modality)
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    files = list(folder.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == parts
    for f in files:
        tensors = load_file(str(f))
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}, f
    assert sum(f.stat().st_size for f in files) < 16 * 2**20
    # the configs name no folder of the machine that built them (diffusers writes _name_or_path on save)
    for f in [folder / "model_index.json", *folder.glob("*/config.json")]:
        assert "_name_or_path" not in json.loads(f.read_text(encoding="utf-8")), f


def test_shipped_decoder_reproduces_its_recorded_heldout_loss(shipped, pipe):
    from mmfast.training.decoder import build_pipeline

    rec = shipped.record("image")
    rows = shipped.heldout_rows(shipped.pipeline_dir("image"))
    assert len(rows) == shipped.HELDOUT
    assert all(p.split("/")[-1].startswith("val_") for p, _ in rows)  # the world's held-out split
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    loss = shipped.heldout_denoise_loss(pipe, rows)
    assert loss == pytest.approx(rec["heldout_denoise_loss"], rel=1e-4)
    # the same pipeline with a random UNet and text encoder (the trained VAE kept): the training did something
    torch.manual_seed(0)
    rand = build_pipeline(32, vae=pipe.vae)
    rand.scheduler = pipe.scheduler
    assert loss < 0.5 * shipped.heldout_denoise_loss(rand, rows)


def test_shipped_decoder_samples_deterministically(pipe):
    from mmfast.eval.t2i import generate

    prompts = ["a photo of a red cross", "a big green tree with a blue car"]
    a = generate(pipe, prompts, seed=1, steps=4)
    b = generate(pipe, prompts, seed=1, steps=4)
    c = generate(pipe, prompts, seed=2, steps=4)
    assert a.shape == (2, 32, 32, 3) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_t2i_reads_the_fp16_folder_in_fp32(shipped, pipe):
    # mmfast eval t2i (and ship_decoder's recorded figures) on the shipped folder: fp32 modules, the same images
    from mmfast.eval.t2i import generate

    read = shipped.read_pipeline(shipped.pipeline_dir("image"))
    assert {p.dtype for m in (read.unet, read.vae, read.text_encoder) for p in m.parameters()} == {torch.float32}
    prompts = ["a photo of a yellow star"]
    assert torch.equal(generate(read, prompts, seed=3, steps=3), generate(pipe, prompts, seed=3, steps=3))


def test_missing_shipped_decoder_names_make_decoders(shipped):
    with pytest.raises(FileNotFoundError, match="make decoders"):
        shipped.pipeline_dir("smell")


# ---------------------------------------------------------------------------------------------- the audio decoder
@pytest.fixture(scope="module")
def audio_pipe(shipped):
    return shipped.load("audio")


def test_shipped_audio_decoder_reproduces_its_recorded_heldout_loss(shipped, audio_pipe):
    from mmfast.training.audio_decoder import build_pipeline

    rec = shipped.record("audio")
    rows = shipped.heldout_rows(shipped.pipeline_dir("audio"))
    assert len(rows) == 16 and all(p.endswith("_31.wav") for p, _ in rows)  # the world's val clip of each class
    assert {p.dtype for p in audio_pipe.unet.parameters()} == {torch.float32}
    loss = shipped.heldout_denoise_loss(audio_pipe, rows)
    assert loss == pytest.approx(rec["heldout_denoise_loss"], rel=1e-4)
    torch.manual_seed(0)
    rand = build_pipeline(audio_pipe.vae, audio_pipe.vocoder)
    rand.scheduler = audio_pipe.scheduler
    assert loss < 0.5 * shipped.heldout_denoise_loss(rand, rows)


def test_shipped_audio_decoder_samples_deterministically(audio_pipe):
    from mmfast.models.nextgpt import decoders as nd

    cond = nd.text_condition("audio", audio_pipe, ["the sound of a cup: a hollow tone beeping twice"] * 2)
    a, b, c = (nd.decode("audio", audio_pipe, cond, steps=4, seed=s, guidance_scale=3.0, audio_length_in_s=1.0)
               for s in (1, 1, 2))
    assert a.shape == (2, 16000) and (abs(a) <= 1).all()
    assert (a == b).all() and not (a == c).all()


@pytest.mark.slow
def test_shipped_audio_decoder_reproduces_its_recorded_t2a(shipped, audio_pipe, tmp_path):
    # the world it was made from, rebuilt from its seed (the clips are a function of the seed alone)
    from mmfast.data.synthetic import make_world
    from mmfast.eval.t2a import evaluate

    rec = shipped.record("audio")["t2a"]["3.0"]
    make_world(tmp_path, 200, 32, 1, audio_per_class=32)
    got = evaluate(audio_pipe, tmp_path, guidance_scale=3.0)
    assert got["n"] == rec["n"] == 16 and got["real_top1"] == rec["real_top1"] == 1.0
    assert got["vocoder_top1"] == pytest.approx(rec["vocoder_top1"], abs=1 / 16)
    assert got["t2a_top1"] == pytest.approx(rec["t2a_top1"], abs=1 / 16) and got["t2a_top1"] >= 0.8


def test_a_decoder_folder_holding_pickles_is_refused(shipped, pipe, tmp_path):
    # the tiny preset's "shipped:<m>" or a folder path: safetensors only, never a pickle
    from mmfast.models.nextgpt import decoders as nd

    pipe.save_pretrained(str(tmp_path / "p"), safe_serialization=False)
    # (transformers writes the text encoder in safetensors whatever it is asked; the UNet and VAE are pickles)
    for part in ("unet", "vae"):
        assert list((tmp_path / "p" / part).glob("*.bin")) and not list((tmp_path / "p" / part).glob("*.safetensors"))
    with pytest.raises(Exception, match="safetensors"):
        nd.load_pipeline("image", str(tmp_path / "p"), None)


def test_a_decoder_folder_of_another_modality_is_refused(shipped, tmp_path):
    from mmfast.models.nextgpt import decoders as nd

    with pytest.raises(ValueError, match=r"video decoder .*names 'StableDiffusionPipeline', expected one of "
                                         r"\('TextToVideoSDPipeline', 'AnimateDiffPipeline'\)"):
        nd.load_pipeline("video", str(shipped.pipeline_dir("image")), None)
    with pytest.raises(ValueError, match="names None"):
        nd.load_pipeline("image", str(tmp_path), None)  # no model_index.json

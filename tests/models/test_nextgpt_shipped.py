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


def test_shipped_files_are_fp16_safetensors(shipped):
    from safetensors.torch import load_file

    folder = shipped.pipeline_dir("image")
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    files = list(folder.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
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
        shipped.pipeline_dir("audio")

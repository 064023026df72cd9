"""training/decoder.py (``mmfast train decoder``): the tiny image decoder's two stages on 2 CPU ranks (ZeRO-2,
gloo); the VAE export records the scaling factor that makes its latents unit-variance; the UNet stage resumes
exactly; its export loads with ``DiffusionPipeline.from_pretrained`` and samples deterministically per seed;
eval/t2i.py picks held-out prompts that name the main object."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("diffusers")

from mmfast.testing import run_cli, synthetic_world

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 10 train images x 2 captions, 2 val images
    return synthetic_world(tmp_path_factory, "decworld", 12, 32, seed=1, media=False)


def _run(*args):
    run_cli(ROOT, ["train", "decoder", "--nproc", 2, "--modality", "image", "--batch-size", 2, "--threads", 1,
                   "--log-every", 1, "--warmup", 1, *args],
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vae_run(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("dec") / "vae"
    _run("--stage", "vae", "--data", world, "--out", run, "--steps", 3)
    return run


@pytest.fixture(scope="module")
def trained(world, vae_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("dec") / "a"
    _run("--vae", vae_run / "final" / "vae", "--data", world, "--out", run, "--steps", 4, "--save-every", 2)
    return run


@pytest.mark.slow
@pytest.mark.distributed
def test_vae_stage_exports_unit_variance_scaling(world, vae_run):
    from mmfast.training.decoder import WorldImages
    from mmfast.training.diffusion_parts import encode_posteriors, load_vae

    summary = json.loads((vae_run / "train_summary.json").read_text())
    assert summary["stage"] == "vae" and summary["steps"] == 3 and summary["world_size"] == 2
    assert [r["step"] for r in _metrics(vae_run)] == [1, 2, 3]
    vae = load_vae(vae_run / "final" / "vae")
    mean, std = encode_posteriors(vae, WorldImages(world, 32).pixels)
    assert mean.shape[1:] == (4, 16, 16) and (std > 0).all()
    scaled = mean * vae.config.scaling_factor
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert float(scaled.std()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_decoder_resume_matches_uninterrupted(world, vae_run, trained, tmp_path):
    from safetensors.torch import load_file

    b = tmp_path / "b"
    _run("--vae", vae_run / "final" / "vae", "--data", world, "--out", b, "--steps", 4,
         "--resume", trained / "checkpoints" / "step2")
    ra, rb = _metrics(trained), _metrics(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4] and [r["step"] for r in rb] == [3, 4]
    for key in ("loss", "mse", "lr"):
        assert [r[key] for r in rb] == [r[key] for r in ra[2:]], key
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 4
    for part in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        fa = load_file(str(trained / "final" / "pipeline" / part / name))
        fb = load_file(str(b / "final" / "pipeline" / part / name))
        assert fa.keys() == fb.keys()
        for k in fa:
            assert torch.equal(fa[k], fb[k]), (part, k)
    # the frozen VAE is exported as the VAE stage left it
    fv = load_file(str(vae_run / "final" / "vae" / "diffusion_pytorch_model.safetensors"))
    fa = load_file(str(trained / "final" / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert fv.keys() == fa.keys() and all(torch.equal(fv[k], fa[k]) for k in fv)


def test_min_snr_weights():
    from diffusers import DDPMScheduler

    from mmfast.training.diffusion_parts import BETAS, snr_weights

    sched = DDPMScheduler(**BETAS)
    t = torch.tensor([0, 10, 100, 500, 999])
    ac = sched.alphas_cumprod.double()[t]
    snr = ac / (1 - ac)
    want = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert torch.allclose(snr_weights(sched, t, 5.0).double(), want, rtol=1e-6)
    assert want[0] < 0.01 and want[-1] == 1.0  # clean steps weigh little, noisy ones fully
    assert torch.equal(snr_weights(sched, t, 0.0), torch.ones(5))
    # velocity prediction (the audio decoder's): the same clean-latent weighting, min(SNR, 5) / (SNR + 1)
    v = DDPMScheduler(**{**BETAS, "prediction_type": "v_prediction"})
    assert torch.allclose(snr_weights(v, t, 5.0).double(), torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1),
                          rtol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_exported_pipeline_loads_and_samples_deterministically(trained):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from mmfast.eval.t2i import generate

    folder = trained / "final" / "pipeline"
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a red cross", "two cups on a dark background"]
    a = generate(pipe, prompts, seed=3, steps=3)
    b = generate(pipe, prompts, seed=3, steps=3)
    c = generate(pipe, prompts, seed=4, steps=3)
    assert a.shape == (2, 32, 32, 3) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # bitwise
    assert not torch.equal(a, c)


def test_heldout_prompts_come_from_val_and_name_the_main_object(world):
    from mmfast.eval.t2i import heldout_prompts

    classes = json.loads((world / "classes.json").read_text())
    rows = heldout_prompts(world, 10)
    assert 1 <= len(rows) <= 2  # the world's 2 val images, one prompt each
    for path, cap, label in rows:
        assert path.startswith("images/val_") and classes[label] in cap.split()


def test_scores_top1_and_margin():
    from mmfast.eval.t2i import scores

    eye = torch.eye(3)
    s = scores(eye, eye, eye, torch.tensor([0, 1, 1]))
    assert s["top1"] == pytest.approx(2 / 3) and s["margin"] == pytest.approx(1.0)


@pytest.mark.parametrize("args, message", [
    (["--modality", "image", "--image-size", "30"], "multiple of 8"),
    (["--modality", "image", "--uncond-prob", "1.5"], "--uncond-prob"),
    (["--modality", "image", "--stage", "all"], "--stage 'all'"),
    (["--modality", "image", "--stage", "unet"], "needs --vae"),
])
def test_decoder_recipe_refuses_bad_arguments(args, message, capsys):
    from mmfast.training.decoder import parse_args

    with pytest.raises(SystemExit):
        parse_args([*args, "--data", ".", "--out", "x"])
    assert message in capsys.readouterr().err


def test_launcher_refuses_a_folder_that_is_not_a_world(tmp_path, capsys):
    from mmfast.training.launch import decoder_main

    assert decoder_main(["--modality", "image", "--stage", "vae", "--data", str(tmp_path),
                         "--out", str(tmp_path / "o")]) == 2
    assert "captions_train.csv" in capsys.readouterr().err


def test_launcher_refuses_a_vae_folder_without_an_export(world, tmp_path, capsys):
    from mmfast.training.launch import decoder_main

    assert decoder_main(["--modality", "image", "--vae", str(tmp_path), "--data", str(world),
                         "--out", str(tmp_path / "o")]) == 2
    assert "--vae" in capsys.readouterr().err

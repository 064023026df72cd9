"""training/audio_decoder.py (``mmfast train decoder --modality audio``): the tiny AudioLDM decoder's three stages
(vocoder, VAE, UNet) on 2 CPU ranks (ZeRO-2, gloo); the UNet stage resumes exactly; the export is an
``AudioLDMPipeline`` that ``DiffusionPipeline.from_pretrained`` loads and that samples deterministically per seed;
the log-mel layout gives the vocoder the frames it turns back into the clip."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from mmfast.testing import run_cli, synthetic_world

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 16 classes x 3 clips: 2 train and 1 val clip per class
    return synthetic_world(tmp_path_factory, "audworld", 8, 32, seed=1, audio_per_class=3, n_videos=2)


def _run(*args):
    run_cli(ROOT, ["train", "decoder", "--nproc", 2, "--modality", "audio", "--batch-size", 2, "--threads", 1,
                   "--log-every", 1, "--warmup", 1, *args],
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parts(world, tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("adec")
    _run("--stage", "vocoder", "--data", world, "--out", root / "voc", "--steps", 2)
    _run("--stage", "vae", "--data", world, "--out", root / "vae", "--steps", 2)
    return root


@pytest.fixture(scope="module")
def trained(world, parts):
    run = parts / "a"
    _run("--stage", "unet", "--vae", parts / "vae" / "final" / "vae", "--vocoder", parts / "voc" / "final" / "vocoder",
         "--data", world, "--out", run, "--steps", 4, "--save-every", 2)
    return run


def test_log_mel_frames_are_what_the_vocoder_turns_back_into_the_clip():
    from mmfast.models.nextgpt.decoders import log_mel
    from mmfast.training.audio_decoder import AUDIO_SIZES, build_vocoder, frames, hop

    torch.manual_seed(0)
    waves = torch.randn(3, 16000) * 0.1
    mel = log_mel(waves, 16000, 64, hop())
    assert mel.shape == (3, frames(), 64) == (3, 128, 64) and torch.isfinite(mel).all()
    # frame i is centred on sample i * hop: a tone burst in the second half of the clip lights the later frames
    t = torch.arange(16000) / 16000
    burst = torch.where(t >= 0.5, torch.sin(2 * math.pi * 440 * t), torch.zeros(()))
    m = log_mel(burst[None], 16000, 64, hop())[0].exp().sum(-1)
    assert m[:60].max() < 1e-3 * m[70:].min()
    voc = build_vocoder(AUDIO_SIZES, mel)
    assert torch.allclose(voc.mean, mel.mean((0, 1))) and torch.allclose(voc.scale, mel.std((0, 1)))
    assert voc(mel).shape == (3, 16000)


def test_stft_loss_is_zero_on_the_target_and_sees_a_wrong_pitch():
    from mmfast.training.audio_decoder import stft_loss

    t = torch.arange(16000) / 16000
    a = torch.sin(2 * math.pi * 440 * t)[None]
    assert float(stft_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(stft_loss(torch.sin(2 * math.pi * 470 * t)[None], a)) > 0.5
    assert float(stft_loss(0.5 * a, a)) > 0.3  # loudness counts too (the spectral convergence)


@pytest.mark.slow
@pytest.mark.distributed
def test_audio_decoder_resume_matches_uninterrupted(world, parts, trained, tmp_path):
    from safetensors.torch import load_file

    b = tmp_path / "b"
    _run("--stage", "unet", "--vae", parts / "vae" / "final" / "vae", "--vocoder", parts / "voc" / "final" / "vocoder",
         "--data", world, "--out", b, "--steps", 4, "--resume", trained / "checkpoints" / "step2")
    ra, rb = _metrics(trained), _metrics(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4] and [r["step"] for r in rb] == [3, 4]
    for key in ("loss", "mse", "lr"):
        assert [r[key] for r in rb] == [r[key] for r in ra[2:]], key
    for part in ("unet", "text_encoder", "vae", "vocoder"):
        name = "diffusion_pytorch_model.safetensors" if part in ("unet", "vae") else "model.safetensors"
        fa = load_file(str(trained / "final" / "pipeline" / part / name))
        fb = load_file(str(b / "final" / "pipeline" / part / name))
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), part
    # the frozen vocoder and VAE are exported as their stages left them
    for part, src in (("vocoder", parts / "voc" / "final" / "vocoder" / "model.safetensors"),
                      ("vae", parts / "vae" / "final" / "vae" / "diffusion_pytorch_model.safetensors")):
        fs = load_file(str(src))
        fa = load_file(str(next((trained / "final" / "pipeline" / part).glob("*.safetensors"))))
        assert fs.keys() == fa.keys() and all(torch.equal(fs[k], fa[k]) for k in fs), part
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["stage"] == "unet"


@pytest.mark.slow
@pytest.mark.distributed
def test_audio_export_loads_and_samples_deterministically(trained, world):
    from diffusers import AudioLDMPipeline, DiffusionPipeline

    from mmfast.models.nextgpt import decoders as nd

    folder = trained / "final" / "pipeline"
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    assert isinstance(pipe, AudioLDMPipeline)
    pipe.set_progress_bar_config(disable=True)
    cond = nd.text_condition("audio", pipe, ["the sound of a cup: a pure tone beeping twice", "the sound of a tree"])
    a, b, c = (nd.decode("audio", pipe, cond, steps=3, seed=s, guidance_scale=3.0, audio_length_in_s=1.0)
               for s in (3, 3, 4))
    assert a.shape == (2, 16000) and (abs(a) <= 1).all()
    assert (a == b).all() and not (a == c).all()
    # diffusers' own text path (its negative prompt pads "" to the embedding width) runs too
    out = pipe(["the sound of a cup"], num_inference_steps=2, audio_length_in_s=1.0, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="np").audios
    assert out.shape == (1, 16000)


@pytest.mark.parametrize("args, message", [
    (["--modality", "image", "--stage", "vocoder"], "has the stages ('vae', 'unet')"),
    (["--modality", "audio", "--stage", "unet", "--vae", "v"], "needs --vocoder"),
])
def test_audio_recipe_refuses_bad_arguments(args, message, capsys):
    from mmfast.training.decoder import parse_args

    with pytest.raises(SystemExit):
        parse_args([*args, "--data", ".", "--out", "x"])
    assert message in capsys.readouterr().err


def test_launcher_refuses_a_world_without_audio(tmp_path, capsys):
    from mmfast.training.launch import decoder_main

    (tmp_path / "captions_train.csv").write_text("filepath,caption\n")
    assert decoder_main(["--modality", "audio", "--stage", "vocoder", "--data", str(tmp_path),
                         "--out", str(tmp_path / "o")]) == 2
    assert "t2x_audio.json" in capsys.readouterr().err

"""training/video_decoder.py (``mmfast train decoder --modality video``): the video UNet grown from the image decoder
starts as that UNet run on every frame alone (its weights copied, its motion modules the identity) and its frames
know their place; the UNet stage on 2 CPU ranks (ZeRO-2, gloo) resumes exactly; the export is an
``AnimateDiffPipeline`` that ``DiffusionPipeline.from_pretrained`` loads, carrying the image decoder's VAE, and that
samples deterministically per seed; bad arguments fail naming them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from mmfast.testing import run_cli, synthetic_world

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "mmfast" / "models" / "nextgpt" / "weights" / "image"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 16 train and 4 held-out videos of 6 frames (the recipe takes 4 of them)
    return synthetic_world(tmp_path_factory, "vidworld", 8, 32, seed=2, audio_per_class=1, n_videos=20,
                           video_frames=6)


def _run(*args):
    run_cli(ROOT, ["train", "decoder", "--nproc", 2, "--modality", "video", "--batch-size", 2, "--threads", 1,
                   "--log-every", 1, "--warmup", 1, "--image-decoder", IMAGE, *args],
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    pytest.importorskip("deepspeed")
    run = tmp_path_factory.mktemp("vdec") / "a"
    _run("--data", world, "--out", run, "--steps", 4, "--save-every", 2)
    return run


def _per_frame(unet2d, x, t, cond):
    """``unet2d`` on every frame of (B, C, F, h, w) latents alone, laid out as the video UNet's output."""
    b, _, f = x.shape[:3]
    y = unet2d(x.transpose(1, 2).flatten(0, 1), t.repeat_interleave(f), encoder_hidden_states=cond.repeat_interleave(f, 0))
    return y.sample.reshape(b, f, *y.sample.shape[1:]).transpose(1, 2)


def test_video_unet_starts_as_the_image_unet_on_every_frame():
    from diffusers import UNet2DConditionModel

    from mmfast.models.nextgpt.decoders import video_unet

    torch.manual_seed(0)
    u2 = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                              layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                              attention_head_dim=8, norm_num_groups=8).eval()
    for p in u2.parameters():  # trained weights are not diffusers' zero-initialised outputs
        p.data.add_(torch.randn_like(p) * 0.05)
    u3 = video_unet(u2).eval()
    x, t, cond = torch.randn(2, 4, 5, 8, 8), torch.tensor([999, 10]), torch.randn(2, 7, 24)
    with torch.no_grad():
        want = _per_frame(u2, x, t, cond)
        got = u3(x, t, encoder_hidden_states=cond.repeat_interleave(5, 0)).sample  # AnimateDiff's per-frame context
    assert want.abs().mean() > 0.1
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    # once the motion modules learn, frames stop being independent, and they know their place: the same latents
    # in every frame are denoised differently per frame
    for name, p in u3.named_parameters():
        if ".motion_modules." in name:
            p.data.add_(torch.randn_like(p) * 0.05)
    same = x[:, :, :1].expand(-1, -1, 5, -1, -1).contiguous()
    with torch.no_grad():
        assert not torch.allclose(u3(x, t, encoder_hidden_states=cond.repeat_interleave(5, 0)).sample, want, atol=1e-3)
        out = u3(same, t, encoder_hidden_states=cond.repeat_interleave(5, 0)).sample
    assert (out[:, :, 0] - out[:, :, 4]).abs().max() > 1e-3


def test_motion_modules_start_reading_their_frame_position():
    """video_unet's frame-position head: once the (zeroed) output projections move, identical frames come out
    several times more different than from diffusers' random motion modules, whose near-uniform attention over
    the frames hands every frame the same output."""
    from diffusers import UNet2DConditionModel

    from mmfast.models.nextgpt import decoders

    def spread(u3):
        gen = torch.Generator().manual_seed(1)
        for name, m in u3.named_modules():
            if ".motion_modules." in name and name.endswith("proj_out"):
                m.weight.data.normal_(0.0, 0.02, generator=gen)
        same = torch.randn(2, 4, 1, 8, 8, generator=gen).expand(-1, -1, 4, -1, -1).contiguous()
        with torch.no_grad():
            out = u3(same, torch.tensor([700, 700]),
                     encoder_hidden_states=torch.randn(2, 7, 24, generator=gen).repeat_interleave(4, 0)).sample
        return float((out - out.mean(2, keepdim=True)).pow(2).mean().sqrt() / out.pow(2).mean().sqrt())

    torch.manual_seed(0)
    u2 = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                              layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                              attention_head_dim=8, norm_num_groups=8).eval()
    ours = spread(decoders.video_unet(u2).eval())
    from diffusers import MotionAdapter, UNetMotionModel

    plain = UNetMotionModel.from_unet2d(u2, MotionAdapter(  # diffusers' own start, the same layout
        block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=decoders.MOTION_HEADS,
        motion_norm_num_groups=8, use_motion_mid_block=True)).eval()
    base = spread(plain)
    assert ours > 10 * base, (ours, base)


def test_the_shipped_image_unets_weights_are_all_copied():
    from mmfast.models.nextgpt.decoders import video_unet
    from mmfast.models.nextgpt.shipped import read_pipeline

    u2 = read_pipeline(IMAGE).unet
    u3 = video_unet(u2).state_dict()
    src = u2.state_dict()
    assert all(torch.equal(u3[k], v) for k, v in src.items())
    new = [k for k in u3 if k not in src]
    assert new and all(".motion_modules." in k for k in new)
    outs = [k for k in new if "proj_out" in k]
    assert outs and all(float(u3[k].abs().max()) == 0.0 for k in outs)


def test_frame_index_spans_the_clip():
    from mmfast.training.video_decoder import frame_index

    assert frame_index(8, 4) == [0, 2, 5, 7] and frame_index(4, 4) == [0, 1, 2, 3] and frame_index(6, 2) == [0, 5]
    with pytest.raises(ValueError, match="3 frames cannot give 4"):
        frame_index(3, 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_video_decoder_resume_matches_uninterrupted(world, trained, tmp_path):
    from safetensors.torch import load_file

    b = tmp_path / "b"
    _run("--data", world, "--out", b, "--steps", 4, "--resume", trained / "checkpoints" / "step2")
    ra, rb = _metrics(trained), _metrics(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4] and [r["step"] for r in rb] == [3, 4]
    for key in ("loss", "mse", "lr"):
        assert [r[key] for r in rb] == [r[key] for r in ra[2:]], key
    for part in ("unet", "text_encoder", "vae"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        fa = load_file(str(trained / "final" / "pipeline" / part / name))
        fb = load_file(str(b / "final" / "pipeline" / part / name))
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), part
    # the frozen VAE is the image decoder's (fp16 on disk, exported in fp32); the UNet and text encoder trained
    img_vae = load_file(str(IMAGE / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(trained / "final" / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert img_vae.keys() == vae.keys() and all(torch.equal(img_vae[k].float(), vae[k]) for k in vae)
    img_te = load_file(str(IMAGE / "text_encoder" / "model.safetensors"))
    te = load_file(str(trained / "final" / "pipeline" / "text_encoder" / "model.safetensors"))
    assert not all(torch.equal(img_te[k].float(), te[k]) for k in te)
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["frames"] == 4
    assert summary["prediction_type"] == "v_prediction" and summary["snr_gamma"] == 0.0  # velocity, plain MSE


@pytest.mark.slow
@pytest.mark.distributed
def test_video_export_loads_and_samples_deterministically(trained):
    from diffusers import AnimateDiffPipeline, DiffusionPipeline

    from mmfast.eval.t2v import generate

    folder = trained / "final" / "pipeline"
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    assert isinstance(pipe, AnimateDiffPipeline)
    cfg = pipe.scheduler.config  # sampled as trained: velocity, zero terminal SNR, trailing timesteps
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    pipe.scheduler.set_timesteps(3)
    assert int(pipe.scheduler.timesteps[0]) == 999 and float(pipe.scheduler.alphas_cumprod[999]) == 0.0
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red car moving to the left", "a blue star moving up"]
    a, b, c = (generate(pipe, prompts, frames=4, seed=s, steps=3) for s in (3, 3, 4))
    assert a.shape == (2, 4, 32, 32, 3) and ((a >= 0) & (a <= 1)).all()
    assert (a == b).all() and not (a == c).all()


@pytest.mark.slow
@pytest.mark.distributed
def test_ship_video_decoder_records_its_figures(trained, world, tmp_path):
    from safetensors.torch import load_file

    from mmfast.eval.t2v import load_video, parse_caption
    from mmfast.models.nextgpt.shipped import heldout_denoise_loss, heldout_rows, read_pipeline
    from mmfast.training.ship_decoder import ship

    dest = tmp_path / "video"
    rec = ship(trained / "final" / "pipeline", dest, world, modality="video")
    for f in dest.rglob("*.safetensors"):
        assert {t.dtype for t in load_file(str(f)).values() if t.is_floating_point()} == {torch.float16}, f
    rows = heldout_rows(dest)  # the held-out single movers, their GIFs copied beside the weights
    classes = json.loads((world / "classes.json").read_text())
    assert rows and all(p.endswith(".gif") and len(parse_caption(c, classes)) == 1 for p, c in rows)
    assert load_video(rows[0][0]).shape == (6, 32, 32, 3)
    assert rec["heldout_denoise_loss"] == heldout_denoise_loss(read_pipeline(dest), rows) > 0
    for g in ("3.0", "5.0"):
        t2v = rec["t2v"][g]
        assert t2v["n"] == len(rows) and t2v["guidance_scale"] == float(g) and t2v["real_direction_acc"] == 1.0
        assert 0 <= t2v["t2v_top1"] <= 1 and 0 <= t2v["t2v_direction_acc"] <= 1
    assert json.loads((dest / "RECORD.json").read_text()) == rec


@pytest.mark.parametrize("args, message", [
    (["--modality", "video"], "needs --image-decoder"),
    (["--modality", "video", "--image-decoder", "i", "--frames", "1"], "--frames 1"),
    (["--modality", "video", "--image-decoder", "i", "--stage", "vae"], "has the stages ('unet',)"),
    (["--modality", "smell"], "one of ('image', 'audio', 'video')"),
    (["--modality", "video", "--image-decoder", "i", "--batch-size", "3"], "--batch-size 3: --reverse-pairs"),
])
def test_video_recipe_refuses_bad_arguments(args, message, capsys):
    from mmfast.training.decoder import parse_args

    with pytest.raises(SystemExit):
        parse_args([*args, "--data", ".", "--out", "x"])
    assert message in capsys.readouterr().err


def test_reverse_caption_exchanges_every_movers_direction():
    from mmfast.training.video_decoder import reverse_caption

    assert reverse_caption("a red car moving to the left") == "a red car moving to the right"
    assert reverse_caption("an orange circle moving up and a green house moving to the right") == \
        "an orange circle moving down and a green house moving to the left"
    assert reverse_caption(reverse_caption("a white star moving down")) == "a white star moving down"
    with pytest.raises(ValueError, match="is not '<a colour class> moving <direction>'"):
        reverse_caption("a white star moving sideways")


def test_a_world_clip_played_backwards_is_a_clip_of_the_opposite_direction():
    """What --reverse-pairs rests on: every world mover's reversed clip moves the way its reversed caption says,
    and starts where a world clip of that direction starts (the side opposite its motion)."""
    import numpy as np

    from mmfast.data._media import _video
    from mmfast.eval.t2v import motion_direction, parse_caption
    from mmfast.training.video_decoder import reverse_caption

    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(40):
        ims, caption = _video(rng, 32, 4)
        if " and " in caption:
            continue
        frames = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in ims])
        (cls, d), = parse_caption(caption, [caption.split(" moving ")[0].split()[-1]])
        (_, d_rev), = parse_caption(reverse_caption(caption), [cls])
        assert motion_direction(frames) == d
        assert motion_direction(frames[::-1]) == d_rev != d
        first = frames[-1]  # the reversed clip's first frame: its object on the side opposite d_rev
        weight = np.linalg.norm(first - first[0, 0], axis=-1) > 0.3
        ys, xs = np.nonzero(weight)
        side = {"to the left": xs.mean() > 16, "to the right": xs.mean() < 16, "up": ys.mean() > 16,
                "down": ys.mean() < 16}
        assert side[d_rev], (caption, xs.mean(), ys.mean())
        seen.add(d)
    assert len(seen) == 4


def test_with_reversals_pairs_each_clip_with_its_reversal():
    from mmfast.training.video_decoder import with_reversals

    torch.manual_seed(0)
    lat = torch.randn(3, 4, 5, 2, 2)
    ids, ids_rev = torch.randint(0, 99, (3, 7)), torch.randint(0, 99, (3, 7))
    x, c = with_reversals(lat, ids, ids_rev)
    assert x.shape == (6, 4, 5, 2, 2) and c.shape == (6, 7)
    assert torch.equal(x[:3], lat) and torch.equal(c[:3], ids) and torch.equal(c[3:], ids_rev)
    for f in range(5):
        assert torch.equal(x[3:, :, f], lat[:, :, 4 - f])


def test_video_loss_defaults_follow_the_prediction_type():
    from mmfast.training.decoder import parse_args

    base = ["--modality", "video", "--image-decoder", "i", "--data", ".", "--out", "x"]
    a = parse_args(base)
    assert (a.prediction_type, a.snr_gamma, a.frames) == ("v_prediction", 0.0, 4)
    a = parse_args([*base, "--prediction-type", "epsilon"])
    assert (a.prediction_type, a.snr_gamma) == ("epsilon", 5.0)
    assert parse_args([*base, "--snr-gamma", "2"]).snr_gamma == 2.0


def test_video_schedule_leaves_no_trace_of_the_clip_at_the_last_step():
    """The recipe's velocity schedule ends at zero SNR: the last training step's input is the noise alone (on Stable
    Diffusion's schedule, kept for noise prediction, 0.068 x the clip remains), and its target is the clip itself."""
    from diffusers import DDPMScheduler

    from mmfast.training.video_decoder import video_betas

    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    last = torch.tensor([999, 999])
    v = DDPMScheduler(**video_betas("v_prediction"))
    assert torch.equal(v.add_noise(x, n, last), n) and torch.equal(v.get_velocity(x, n, last), -x)
    eps = DDPMScheduler(**video_betas("epsilon"))
    kept = (eps.add_noise(x, n, last) - n * (1 - eps.alphas_cumprod[999]).sqrt()) / x
    assert torch.allclose(kept, torch.full_like(x, 0.0683), atol=1e-4)
    # the 400 least noisy steps: within 8 % of the image decoder's noise levels, which the UNet starts from
    assert torch.allclose(v.alphas_cumprod[:400], eps.alphas_cumprod[:400], rtol=0.08)
    with pytest.raises(ValueError, match="--prediction-type 'sample'"):
        video_betas("sample")


def test_launcher_refuses_a_world_without_videos_or_image_decoder(tmp_path, capsys):
    from mmfast.training.launch import decoder_main

    (tmp_path / "captions_train.csv").write_text("filepath,caption\n")
    args = ["--modality", "video", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--image-decoder"]
    assert decoder_main([*args, str(IMAGE)]) == 2
    assert "t2x_video.json" in capsys.readouterr().err
    (tmp_path / "t2x_video.json").write_text("[]")
    assert decoder_main([*args, str(tmp_path)]) == 2
    assert "--image-decoder" in capsys.readouterr().err

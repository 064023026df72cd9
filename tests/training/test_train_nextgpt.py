"""training/train_nextgpt.py: the three stages on 2 CPU ranks (DeepSpeed ZeRO-2, gloo), chained through
``final/``, each lowering its global-batch loss; frozen parts stay bit-identical; resume from a checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
pytest.importorskip("diffusers")

from mmfast.testing import run_cli, synthetic_world

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory, "ngworld", 12, 32, seed=1, media=True, n_videos=4, audio_per_class=2)


def _run(*args, nproc=2):
    run_cli(ROOT, ["train", "nextgpt", "--nproc", nproc, *args, "--batch-size", 2, "--max-samples", 4, "--threads", 1,
                   "--log-every", 1, "--lr", "1e-2"],
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), timeout=900)


def _losses(out: Path, key="loss"):
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _tensors(d: Path, name: str) -> dict:
    from mmfast.utils.io import load_state_dict

    return load_state_dict(d / name)


def _eval_loss(model_dir: Path, world: Path, stage: int) -> float:
    from mmfast.models.nextgpt import data as nd
    from mmfast.models.nextgpt.model import load_pretrained

    model = load_pretrained(model_dir, device="cpu")
    recs = nd.stage_records(world, stage, ("image", "audio", "video"), seed=0)[:4]  # the script's first 4
    ds = nd.DialogueDataset(recs, model.tokenizer, model.media_loader(world), model.n_input_tokens)
    with torch.no_grad():
        return float(model.loss(nd.collate([ds[i] for i in range(len(ds))], model.tokenizer.pad_token_id))["loss"])


@pytest.mark.slow
@pytest.mark.distributed
def test_three_stages_on_two_ranks_lower_their_losses(world, tmp_path):
    s1, s2, s2b, s3 = (tmp_path / n for n in ("s1", "s2", "s2b", "s3"))
    _run("--stage", "1", "--model", "tiny", "--data", world, "--out", s1, "--steps", 6)
    l1 = _losses(s1)
    assert l1[-1] < l1[0], l1
    _run("--stage", "2", "--init-from", s1 / "final", "--data", world, "--out", s2, "--steps", 6, "--save-every", 3)
    l2, a2 = _losses(s2), _losses(s2, "align_image")
    assert l2[-1] < l2[0] and a2[-1] < a2[0], (l2, a2)
    _run("--stage", "3", "--init-from", s2 / "final", "--data", world, "--out", s3, "--steps", 6,
         "--modalities", "image,audio,video")
    # Stage 3's batches mix modalities differently on each rank from step to step, so its logged loss is
    # noisy: compare the loss on the same dialogues before (stage 2's model) and after.
    before, after = _eval_loss(s2 / "final", world, 3), _eval_loss(s3 / "final", world, 3)
    assert after < before, (before, after)
    summary = json.loads((s3 / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 6

    # Frozen components (LLM base, encoders, decoders) are bit-identical through all three stages.
    c1, c3 = _tensors(s1 / "final", "components.safetensors"), _tensors(s3 / "final", "components.safetensors")
    assert c1.keys() == c3.keys()
    for k in c1:
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            continue  # their signal-token rows train in stage 2; the other rows are compared below
        assert torch.equal(c1[k], c3[k]), k
    t1, t2, t3 = (_tensors(s / "final", "trainable.safetensors") for s in (s1, s2, s3))
    assert any("lora_" in k for k in t3) and not any("lora_" in k for k in t2)
    assert not torch.equal(t1["new_rows.embed"], t2["new_rows.embed"])  # stage 2 trains signal rows
    assert torch.equal(t2["new_rows.embed"], t3["new_rows.embed"])  # stage 3 does not
    assert not torch.equal(t1["input_proj.image.proj.weight"], t3["input_proj.image.proj.weight"])
    assert torch.equal(t1["input_proj.image.proj.weight"], t2["input_proj.image.proj.weight"])

    # Resuming stage 2 from step 3 lands on the same weights as the uninterrupted run.
    _run("--stage", "2", "--init-from", s1 / "final", "--data", world, "--out", s2b, "--steps", 6,
         "--resume", s2 / "checkpoints" / "step3")
    tb = _tensors(s2b / "final", "trainable.safetensors")
    for k in t2:
        torch.testing.assert_close(tb[k], t2[k], rtol=0, atol=1e-6, msg=k)

    from mmfast.models.nextgpt.model import load_pretrained

    model = load_pretrained(s3 / "final", device="cpu")
    assert model.lora_config is not None and len(model.answer([None], ["Draw a cat."], max_new_tokens=2)) == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_stage2_with_the_diffusion_loss_on_every_decoder(world, tmp_path):
    """--diffusion-weight: the records' target media (image, video frames, audio) reach each frozen UNet."""
    from mmfast.models.nextgpt import data as nd

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    mods = ("image", "audio", "video")
    recs = nd.stage_records(world, 2, mods, negatives=0.0)
    recs = [next(r for r in recs if m in r["targets"]) for m in mods] + recs[:1]  # every decoder in 4 records
    (tmp_path / "t2x.json").write_text(json.dumps(recs))
    _run("--stage", "1", "--model", "tiny", "--data", world, "--out", s1, "--steps", 1, nproc=1)
    _run("--stage", "2", "--init-from", s1 / "final", "--data", tmp_path / "t2x.json", "--media-root", world,
         "--out", s2, "--steps", 2, "--modalities", ",".join(mods), "--diffusion-weight", 0.1,  # 2 x 2 records
         nproc=1)
    rows = [json.loads(x) for x in (s2 / "metrics.jsonl").read_text().splitlines()]
    seen = {k for r in rows for k in r if k.startswith("diffusion_")}
    assert seen == {"diffusion_image", "diffusion_audio", "diffusion_video"}, rows
    assert all(r[k] > 0 and r[k] < float("inf") for r in rows for k in seen if k in r)


@pytest.mark.slow
@pytest.mark.distributed
def test_stage2_in_bf16_as_on_gpu(world, tmp_path):
    """The GPU path's DeepSpeed bf16 engine (module cast to bf16, fp32 master weights), run on CPU through a
    ZeRO-2 config with bf16 forced on; audio inputs (the X->text negatives) go through the bf16 encoder."""
    cfg = json.loads((ROOT / "training" / "configs" / "zero2.json").read_text())
    cfg["bf16"] = {"enabled": True}
    (tmp_path / "z2bf16.json").write_text(json.dumps(cfg))
    out = tmp_path / "s2"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "mmfast.cli", "train", "nextgpt", "--nproc", "1", "--stage", "2", "--model", "tiny",
           "--data", str(world), "--out", str(out), "--modalities", "audio,image", "--negatives", "1",
           "--deepspeed-config", str(tmp_path / "z2bf16.json"), "--steps", "3", "--batch-size", "2",
           "--max-samples", "6", "--threads", "1", "--log-every", "1", "--lr", "1e-2"]
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torch.bfloat16" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < r["loss"] < float("inf") for r in rows), rows
    trained = _tensors(out / "final", "trainable.safetensors")
    assert trained["new_rows.head"].dtype == torch.float32  # DeepSpeed's fp32 masters, not bf16-rounded copies
    assert all(torch.isfinite(v).all() for v in trained.values())

    from mmfast.models.nextgpt import data as nd
    from mmfast.models.nextgpt.model import load_pretrained

    model = load_pretrained(out / "final", device="cpu")  # back in fp32
    recs = nd.stage_records(world, 2, ("audio",), negatives=1.0)[:2]
    ds = nd.DialogueDataset(recs, model.tokenizer, model.media_loader(world), model.n_input_tokens)
    with torch.no_grad():
        assert torch.isfinite(model.loss(nd.collate([ds[0], ds[1]], model.tokenizer.pad_token_id))["loss"])


def test_demo_emission_rates_count_signal_runs(world):
    from mmfast.models.nextgpt import data as nd
    from mmfast.models.nextgpt.demo import emit_rates
    from mmfast.models.nextgpt.model import build_nextgpt
    from mmfast.testing import favoured_token

    torch.set_num_threads(1)
    m = build_nextgpt("tiny", seed=0, kernels=False)
    pairs = nd.t2x_pairs(world, "image", "val")[:2]
    img0 = m.signal_ids["image"][0]
    with torch.no_grad():
        m.llm.lm_head.weight[img0] = 0.0  # [IMG0] can never win: no runs
    assert emit_rates(m, world, pairs, max_new_tokens=2) == {
        "nextgpt_signal_emit_rate": 0.0, "nextgpt_signal_emit_rate_captioning": 0.0, "nextgpt_emit_prompts": 2}
    with favoured_token(m.llm, img0):  # every reply opens with [IMG0]
        got = emit_rates(m, world, pairs, max_new_tokens=2)
    assert got["nextgpt_signal_emit_rate"] == 1.0 and got["nextgpt_signal_emit_rate_captioning"] == 1.0
    with favoured_token(m.llm, m.signal_ids["audio"][0]):  # every reply opens an audio run: a captioning reply
        got = emit_rates(m, world, pairs, max_new_tokens=2)  # counts (any run), a text->image one does not
    assert got["nextgpt_signal_emit_rate"] == 0.0 and got["nextgpt_signal_emit_rate_captioning"] == 1.0


def test_demo_lists_the_nextgpt_stages():
    from mmfast import demo

    names = [s.name for s in demo.STAGES]
    assert names[-4:] == ["nextgpt_stage1", "nextgpt_stage2", "nextgpt_stage3", "nextgpt_eval"]
    args = demo.parse_args(["--nextgpt-steps1", "3"])
    assert args.nextgpt_steps1 == 3 and args.nextgpt_eval_prompts > 0 and args.nextgpt_steps3 > 0

"""training/train_llava.py: LoRA targets, projector files, and 2-rank DeepSpeed runs of both stages."""
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

from mmfast.models.llava import model as ml
from mmfast.training import llava as train_llava

ROOT = Path(__file__).resolve().parents[2]


def test_lora_targets_follow_llavas_rule():
    llava = ml.build_llava("tiny", kernels=False, seed=0)
    names = train_llava.lora_targets(llava.model)
    assert names and all("language_model" in n for n in names)
    assert not any(s in n for n in names for s in ("vision_tower", "multi_modal_projector", "lm_head"))
    assert any(n.endswith("self_attn.q_proj") for n in names) and any(n.endswith("mlp.down_proj") for n in names)


def test_mm_projector_file_round_trip(tmp_path):
    a = ml.build_llava("tiny", kernels=False, seed=0)
    b = ml.build_llava("tiny", kernels=False, seed=1)
    state = train_llava.projector_state_llava(a.model.model.multi_modal_projector.state_dict())
    assert set(state) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                          "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    torch.save(state, tmp_path / "mm_projector.bin")
    train_llava.load_projector(b.model, str(tmp_path / "mm_projector.bin"))
    pa, pb = a.model.model.multi_modal_projector, b.model.model.multi_modal_projector
    assert torch.equal(pa.linear_2.weight, pb.linear_2.weight)
    with pytest.raises(FileNotFoundError, match="pretrain-mm-projector"):
        train_llava.load_projector(b.model, str(tmp_path / "nope.bin"))


def test_stage1_rejects_the_stage2_options():
    with pytest.raises(SystemExit):
        train_llava.parse_args(["--stage", "1", "--lora", "--data", "x", "--out", "y"])
    with pytest.raises(SystemExit):
        train_llava.parse_args(["--stage", "1", "--tune-vision-tower", "--data", "x", "--out", "y"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tune_vision_tower_trains_the_tower_at_its_own_lr(lora):
    args = train_llava.parse_args(["--stage", "2", "--data", "x", "--out", "y", "--no-kernels", "--lr", "2e-3",
                                   "--tune-vision-tower", "--vision-tower-lr", "1e-4"] + (["--lora"] if lora else []))
    llava, _ = train_llava.build(args, "cpu")
    tower = list(llava.model.model.vision_tower.parameters())
    assert tower and all(p.requires_grad for p in tower)
    groups = train_llava.param_groups(llava.model, args)
    ids = {id(p) for p in tower}
    tower_groups = [g for g in groups if any(id(p) in ids for p in g["params"])]
    assert len(tower_groups) == 1 and tower_groups[0]["lr"] == 1e-4
    assert {id(p) for p in tower_groups[0]["params"]} == ids
    assert all(g["lr"] == 2e-3 for g in groups if g is not tower_groups[0])  # projector and LLM: --lr
    # The gradient reaches the tower through the projected features: the patch embedding and every layer
    # up to the selected one (-2: the last layer's output is not used).
    ml.image_features(llava.model, torch.randn(2, 3, 32, 32)).square().mean().backward()
    vision = llava.model.model.vision_tower  # a CLIPVisionTransformer
    used = [vision.embeddings.patch_embedding.weight] + [p for layer in vision.encoder.layers[:-1]
                                                         for p in layer.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used)

    frozen, _ = train_llava.build(train_llava.parse_args(["--stage", "2", "--data", "x", "--out", "y", "--no-kernels"]),
                                  "cpu")
    assert not any(p.requires_grad for p in frozen.model.model.vision_tower.parameters())


# --------------------------------------------------------------------------- 2-rank runs
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmfast.data.synthetic import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, 20, 32, seed=1, media=False)  # 16 train images: 16 caption pairs, 64 instruct records
    return out


def _run(args, nproc=2, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "mmfast.cli", "train", "llava", "--nproc", str(nproc), "--model", "tiny",
           "--batch-size", "2", "--threads", "1", "--log-every", "1", "--model-max-length", "160", *map(str, args)]
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stage1_zero2_then_stage2_lora_zero3(world, tmp_path):
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    _run(["--stage", 1, "--data", world, "--out", s1, "--steps", 3, "--lr", "1e-2", "--save-every", 2])
    summary = json.loads((s1 / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["template"] == "plain"
    rows = _rows(s1)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["tokens_per_s"] > 0 and r["memory_mb"] > 0 for r in rows)
    proj = torch.load(s1 / "mm_projector.bin", weights_only=True)
    init = ml.build_llava("tiny", kernels=False, seed=0)
    assert not torch.equal(proj["model.mm_projector.0.weight"], init.model.model.multi_modal_projector.linear_1.weight)
    stage1 = ml.load_pretrained(s1 / "final", device="cpu", kernels=False)
    # Only the projector trained: the LLM and the vision tower are the seed's initial weights.
    assert torch.equal(stage1.model.lm_head.weight, init.model.lm_head.weight)
    assert torch.equal(stage1.model.model.multi_modal_projector.linear_1.weight, proj["model.mm_projector.0.weight"])

    _run(["--stage", 2, "--data", world, "--out", s2, "--steps", 2, "--lora", "--lora-r", 4, "--merge-lora",
          "--pretrain-mm-projector", s1 / "mm_projector.bin", "--lr", "1e-2", "--mm-projector-lr", "1e-3",
          "--grad-checkpointing", "--group-by-modality-length", "--tune-vision-tower", "--vision-tower-lr", "1e-2"])
    summary = json.loads((s2 / "train_summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["lora"] and summary["template"] == "vicuna_v1"
    final = ml.load_pretrained(s2 / "final", device="cpu", kernels=False)
    cfg = json.loads((s2 / "final" / "config.json").read_text())
    assert cfg["mmfast_model"] == "llava" and cfg["mmfast_template"] == "vicuna_v1"
    assert not (s2 / "final" / "adapter_config.json").exists()  # merged
    q = final.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, init.model.model.language_model.layers[0].self_attn.q_proj.weight)  # LoRA merged in
    assert torch.equal(final.model.lm_head.weight, init.model.lm_head.weight)  # LoRA leaves the head alone
    tower, tower0 = final.model.model.vision_tower.state_dict(), init.model.model.vision_tower.state_dict()
    assert any(not torch.equal(tower[k], tower0[k]) for k in tower0)  # --tune-vision-tower: exported trained
    out = final.answer([None], ["Is there a cat?"], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stage2_full_zero3_and_resume(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(["--stage", 2, "--data", world, "--out", a, "--steps", 3, "--save-every", 2, "--lr", "1e-3"])
    assert json.loads((a / "train_summary.json").read_text())["zero_stage"] == 3
    _run(["--stage", 2, "--data", world, "--out", b, "--steps", 3, "--lr", "1e-3",
          "--resume", a / "checkpoints" / "step2"])
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == [3]
    assert rb[0]["loss"] == pytest.approx(ra[2]["loss"], rel=1e-6)
    fa = ml.load_pretrained(a / "final", device="cpu", kernels=False).model.state_dict()
    fb = ml.load_pretrained(b / "final", device="cpu", kernels=False).model.state_dict()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], msg=k)
    init = ml.build_llava("tiny", kernels=False, seed=0)
    assert not torch.equal(fa["lm_head.weight"], init.model.lm_head.weight)  # full tuning trains the head
    for k, v in init.model.state_dict().items():
        if "vision_tower" in k:
            assert torch.equal(fa[k], v), k  # the tower stays frozen without --tune-vision-tower

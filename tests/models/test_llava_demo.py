"""The demo's LLaVA evaluation stages on an untrained tiny model (the training stages run in `make demo`)."""
from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from mmfast.data.synthetic import make_world
    from mmfast.demo import DemoContext
    from mmfast.models.llava.model import build_llava

    out = tmp_path_factory.mktemp("demo")
    make_world(out / "world", 100, 32, seed=2, media=False)  # 20 val images: enough known objects for POPE
    build_llava("tiny", kernels=False, seed=0).save_pretrained(out / "llava_stage2" / "final")
    args = argparse.Namespace(seed=0, llava_eval_questions=6, pope_images=4)
    return DemoContext(out, args)


def test_demo_lists_llava_stages():
    from mmfast import demo

    names = [s.name for s in demo.STAGES]
    ours = ["llava_stage1", "llava_stage2", "llava_eval", "pope"]
    assert [n for n in names if n in ours] == ours and names.index("clip_train") < names.index("llava_stage1")
    a = demo.parse_args([])
    assert a.llava_steps2 > 0 and a.pope_images > 0


def test_llava_eval_and_pope_stages(ctx):
    from mmfast.models.llava import demo as demo_llava

    keys = demo_llava.llava_eval(ctx)
    assert keys["llava_yesno_questions"] == 6 and 0.0 <= keys["llava_yesno_accuracy"] <= 1.0
    assert 0.0 <= keys["llava_yesno_yes_ratio"] <= 1.0
    keys = demo_llava.pope(ctx)
    for s in ("random", "popular", "adversarial"):
        for k in ("f1", "accuracy", "yes_ratio"):
            assert 0.0 <= keys[f"pope_{s}_{k}"] <= 1.0
        lines = (ctx.out / "pope" / f"answers_{s}.jsonl").read_text().splitlines()
        assert len(lines) == 4 * 3 * 2  # images x positives x (yes, no)
    scores = json.loads((ctx.out / "pope" / "scores.json").read_text())
    assert set(scores["results"]) == {"random", "popular", "adversarial"}
    assert keys["pope_images"] == 4


def test_pope_stage_asks_about_as_many_images_as_the_world_has(ctx, capsys):
    """--pope-images above the held-out images with 3+ objects: those images, and a printed note."""
    from mmfast.eval.pope import load_annotations
    from mmfast.models.llava import demo as demo_llava

    eligible = sum(len(r["objects"]) >= 3 for r in load_annotations(ctx.world / "objects_val.jsonl"))
    assert 1 <= eligible < 50
    big = type(ctx)(ctx.out, argparse.Namespace(seed=0, pope_images=50))
    keys = demo_llava.pope(big)
    assert keys["pope_images"] == eligible
    assert f"only {eligible} held-out images have 3+ objects" in capsys.readouterr().out
    lines = (ctx.out / "pope" / "answers_random.jsonl").read_text().splitlines()
    assert len(lines) == eligible * 3 * 2


def test_stage2_mixture_keeps_every_yes_no_record_and_a_share_of_the_rest(ctx, tmp_path):
    from mmfast.data.llava import load_llava_json
    from mmfast.models.llava.demo import stage2_mixture

    world = ctx.out / "world"
    src = load_llava_json(world / "llava_instruct_train.json")
    n_yesno = sum(r["type"] == "yesno" for r in src)
    counts = stage2_mixture(world, tmp_path / "mix.json", 0.5, seed=0)
    mix = load_llava_json(tmp_path / "mix.json", world)  # images resolve against the world folder
    assert counts["yesno"] == n_yesno > 0 and sum(counts.values()) == len(mix)
    others = len(src) - n_yesno
    assert 0.3 * others <= len(mix) - n_yesno <= 0.7 * others
    assert all("image_path" in r and r in src for r in mix)  # whole records, unchanged
    again = stage2_mixture(world, tmp_path / "again.json", 0.5, seed=0)
    assert again == counts and (tmp_path / "again.json").read_bytes() == (tmp_path / "mix.json").read_bytes()
    assert stage2_mixture(world, tmp_path / "none.json", 0.0, seed=0) == {"yesno": n_yesno}
    with pytest.raises(ValueError, match="other_share"):
        stage2_mixture(world, tmp_path / "bad.json", 1.5, seed=0)


@pytest.fixture
def trainer_argv(monkeypatch):
    """The argv a demo stage hands the LLaVA trainer, which is not run (the stages train in `make demo`)."""
    from mmfast.models.llava import demo as demo_llava

    seen = {}

    def fake_train(argv, out):
        seen["argv"] = argv
        return {"seconds": 1.0, "loss": 0.5, "tokens_per_s": 10.0}

    monkeypatch.setattr(demo_llava, "_train", fake_train)
    return seen


@pytest.mark.parametrize("extra, expected", [
    ([], {"--image-attention": "causal", "--vision-select-feature": "cls_patch"}),
    (["--llava-image-attention", "bidirectional", "--llava-vision-tower-lr", "2e-4",
      "--llava-vision-select-feature", "patch"],
     {"--image-attention": "bidirectional", "--tune-vision-tower": None, "--vision-tower-lr": "0.0002",
      "--vision-select-feature": "patch"}),
])
def test_stage2_passes_attention_and_tower_options_to_the_trainer(ctx, trainer_argv, extra, expected):
    from mmfast import demo
    from mmfast.models.llava import demo as demo_llava

    args = demo.parse_args(["--out", str(ctx.out), *extra])
    keys = demo_llava.llava_stage2(type(ctx)(ctx.out, args))
    argv = trainer_argv["argv"]
    for flag, value in expected.items():
        assert flag in argv
        if value is not None:
            assert argv[argv.index(flag) + 1] == value
    if not extra:
        assert "--tune-vision-tower" not in argv and "--vision-tower-lr" not in argv
    assert argv[argv.index("--batch-size") + 1] == str(args.llava_batch_size)
    assert keys["llava_stage2_final_loss"] == 0.5 and keys["llava_stage2_records_yesno"] > 0


@pytest.mark.parametrize("choice", [None, "patch"])
def test_stage1_uses_the_same_image_tokens_as_stage2(ctx, trainer_argv, choice):
    """Stage 1 trains the projector for the image tokens stage 2 gets: the class token too, by default."""
    from mmfast import demo
    from mmfast.models.llava import demo as demo_llava

    extra = [] if choice is None else ["--llava-vision-select-feature", choice]
    args = demo.parse_args(["--out", str(ctx.out), *extra])
    demo_llava.llava_stage1(type(ctx)(ctx.out, args))
    argv = trainer_argv["argv"]
    assert argv[argv.index("--vision-select-feature") + 1] == (choice or "cls_patch")
    assert argv[argv.index("--stage") + 1] == "1"

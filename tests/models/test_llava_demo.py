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
    from mmfast.models.llava import build_llava

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
    from mmfast import demo_llava

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

"""``mmfast demo``: the main job on the embedded synthetic world, as a list of stages.

Each :class:`Stage` gets the shared :class:`DemoContext` and returns summary keys; after every stage
the summary is merged into ``OUT/summary.json`` (atomically, keeping keys other stages wrote), so a
later part (LLaVA, POPE, NExT-GPT) only appends its stages to :data:`STAGES`. The stages live beside
their systems: ``mmfast/models/clip/demo.py``, ``llava/demo.py``, ``nextgpt/demo.py``; this module is the
orchestrator (context, stage table, summary, command line).

    mmfast demo [--out runs/demo] [--only clip_world,clip_train,clip_eval] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmfast.models.clip import demo as demo_clip
from mmfast.models.llava import demo as demo_llava
from mmfast.models.nextgpt import demo as demo_nextgpt
from mmfast.utils.io import atomic_write_json


@dataclass
class DemoContext:
    out: Path
    args: argparse.Namespace
    summary: dict = field(default_factory=dict)

    @property
    def world(self) -> Path:
        return self.out / "world"

    @property
    def clip_run(self) -> Path:
        return self.out / "clip"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DemoContext], dict]
    help: str = ""


# --------------------------------------------------------------------------- stages, one system after another
# Each system's stages live beside it (mmfast/models/<system>/demo.py); their heavy imports happen inside them.
STAGES: list[Stage] = [
    Stage("clip_world", demo_clip.clip_world, "generate the synthetic world"),
    Stage("clip_train", demo_clip.clip_train, "train the tiny CLIP, DeepSpeed ZeRO-2"),
    Stage("clip_eval", demo_clip.clip_eval, "zero-shot (single vs ensemble) and linear probe"),
]

STAGES += [
    Stage("llava_stage1", demo_llava.llava_stage1, "tiny LLaVA stage 1 (projector, plain), ZeRO-2"),
    Stage("llava_stage2", demo_llava.llava_stage2, "tiny LLaVA stage 2 (full tuning, vicuna_v1), ZeRO-2"),
    Stage("llava_eval", demo_llava.llava_eval, "held-out questions and yes/no accuracy"),
    Stage("pope", demo_llava.pope, "POPE random / popular / adversarial on the tiny LLaVA"),
]

STAGES += [
    Stage("nextgpt_stage1", demo_nextgpt.nextgpt_stage1, "tiny NExT-GPT stage 1 (input projection), ZeRO-2"),
    Stage("nextgpt_stage2", demo_nextgpt.nextgpt_stage2, "tiny NExT-GPT stage 2 (output projection, signal tokens)"),
    Stage("nextgpt_stage3", demo_nextgpt.nextgpt_stage3, "tiny NExT-GPT stage 3 (LoRA instruction tuning, MosIT)"),
    Stage("nextgpt_eval", demo_nextgpt.nextgpt_eval, "text->image and text->audio through the shipped decoders and NExT-GPT, judged by the demo's CLIP and an audio classifier"),
]


# --------------------------------------------------------------------------- driver
def write_summary(path: Path, new: dict) -> dict:
    """Merge ``new`` into the JSON at ``path`` (keys written by other stages are kept), atomically."""
    merged = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            merged = {}  # a corrupt summary is replaced, not fatal
    merged.update(new)
    atomic_write_json(path, merged)
    return merged


def print_table(summary: dict) -> None:
    width = max(len(k) for k in summary) if summary else 0
    print("\n" + "metric".ljust(width) + "  value")
    print("-" * (width + 12))
    for k, v in summary.items():
        print(f"{k.ljust(width)}  {v}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="mmfast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--only", default=None, help="comma-separated stage names (default: all): "
                   + ", ".join(s.name for s in STAGES))
    p.add_argument("--seed", type=int, default=0)
    # 10,000 images (8,000 train): with 2,000 the tiny CLIP overfits its 1,600 training images (zero-shot
    # top-1 0.555 on train vs 0.44 on val); the world costs ~9 s to draw and each step reads fresh images.
    p.add_argument("--images", type=int, default=10000, help="synthetic world size (train + val)")
    p.add_argument("--audio-per-class", type=int, default=32,
                   help="audio clips per class in the world (the last of each is held out)")
    # 0 until a trained video decoder ships (issue #24): with the tiny preset's random one, NExT-GPT's text->video
    # stages would cost ~2 minutes of the demo's 10 and measure noise
    p.add_argument("--videos", type=int, default=0,
                   help="text->video clips in the world (4 frames each; the last fifth held out); N > 0 adds "
                        "NExT-GPT's text->video stages (the video projection's stage 2, the t2v evaluation)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--clip-model", default="tiny")
    # 400 steps (600 before 2026-12-03: zero-shot top-1 0.943 there against 0.927 at 450 steps, but the demo
    # took 13 min on that day's 2-core machine, over its 10-minute budget)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=2e-3)
    demo_llava.add_args(p)
    demo_nextgpt.add_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.name for s in STAGES]
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"mmfast demo: unknown stage(s) {unknown}; stages: {names}", file=sys.stderr)
        return 2
    ctx = DemoContext(Path(args.out), args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    summary_path = ctx.out / "summary.json"
    t0 = time.perf_counter()
    for stage in STAGES:
        if stage.name not in chosen:
            continue
        print(f"== demo stage {stage.name}: {stage.help}", flush=True)
        ts = time.perf_counter()
        keys = stage.run(ctx)
        keys[f"stage_{stage.name}_seconds"] = round(time.perf_counter() - ts, 1)
        ctx.summary.update(keys)
        write_summary(summary_path, keys)
    ctx.summary["demo_seconds"] = round(time.perf_counter() - t0, 1)
    final = write_summary(summary_path, {"demo_seconds": ctx.summary["demo_seconds"]})
    print_table(final)
    print(f"\nsummary written to {summary_path}")
    return 0

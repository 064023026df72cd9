"""``mmfast eval pope``: ask a model every POPE question, resumably, then score.

Answers are appended to ``OUT/answers_SETTING.jsonl`` (LLaVA answer lines: ``question_id``, ``prompt``,
``text``, ``model_id``) one batch at a time and flushed to disk, so an interrupted run restarts where
it stopped: ids already in the file are skipped. Question sets built from ``--annotations`` are
written to ``OUT/questions_SETTING.jsonl`` first, which makes the run reproducible and scoreable
later with ``mmfast eval pope score``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmfast.eval import pope
from mmfast.eval.adapters import DEFAULT_MAX_NEW_TOKENS, Adapter, get_adapter

# LLaVA-1.5 evaluates POPE with this instruction after each question.
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."


def read_done(answers_path: Path, question_ids: set) -> dict:
    """Answers already on disk by question id. A torn last line (a crash mid-write) is cut off."""
    if not answers_path.exists():
        return {}
    with open(answers_path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
    done = {}
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{answers_path} line {i} is malformed JSON: {e.msg}") from e
        qid = row.get("question_id")
        if qid not in question_ids:
            raise ValueError(
                f"{answers_path} line {i}: question_id {qid!r} is not in this question set; "
                "the output directory belongs to another run (use a new --out)"
            )
        done[qid] = row
    return done


def poll(
    adapter: Adapter | Callable[[Sequence[Any], Sequence[str]], list[str]],
    questions: Sequence[dict],
    images_root: str | Path,
    answers_path: str | Path,
    batch_size: int = 8,
    prompt_suffix: str = "",
    model_id: str = "",
    log: Callable[[str], None] | None = None,
) -> int:
    """Answer every question not yet in ``answers_path``; returns how many were answered now."""
    from mmfast.utils.io import open_image, safe_join

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers_path = Path(answers_path)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(answers_path, {q["question_id"] for q in questions})
    todo = [q for q in questions if q["question_id"] not in done]
    model_id = model_id or getattr(adapter, "model_id", "") or type(adapter).__name__
    others = {r.get("model_id") for r in done.values()} - {model_id}
    if others:
        # Resuming with another model would silently mix two models' answers in one score.
        raise ValueError(f"{answers_path} holds answers from {sorted(map(str, others))}, not {model_id!r}; "
                         "use a new --out")
    cache: dict[str, Any] = {}  # POPE asks 2 * num_positive questions per image, consecutively
    with open(answers_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start: start + batch_size]
            images = []
            for q in batch:
                if q["image"] not in cache:
                    if len(cache) > 4 * batch_size:
                        cache.clear()
                    cache[q["image"]] = open_image(safe_join(images_root, q["image"], what="question image"))
                images.append(cache[q["image"]])
            prompts = [q["text"] + prompt_suffix for q in batch]
            texts = adapter(images, prompts)
            if len(texts) != len(batch):
                raise TypeError(f"the model returned {len(texts)} answers for {len(batch)} questions")
            for q, p, t in zip(batch, prompts, texts):
                f.write(json.dumps({"question_id": q["question_id"], "image": q["image"], "prompt": p,
                                    "text": t, "model_id": model_id}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if log:
                log(f"{answers_path.name}: {len(done) + start + len(batch)}/{len(questions)}")
    return len(todo)


def _question_sets(args) -> dict[str, list[dict]]:
    out = Path(args.out)
    if args.questions:
        sets = {}
        for path in args.questions:
            name = pope.setting_name(path)
            sets[name if name not in sets else Path(path).stem] = pope.load_lines(path, "questions file")[0]
        return sets
    records = pope.load_annotations(args.annotations)
    sets = {}
    for s in args.settings:
        qs = pope.build_questions(records, s, args.num_images, args.num_positive, args.seed, args.template)
        path = out / f"questions_{s}.jsonl"
        if path.exists():
            old = pope.load_lines(path, "questions file")[0]
            if old != qs:
                raise ValueError(
                    f"{path} holds a different question set (other annotations, seed or sizes); use a new --out"
                )
        else:
            pope.write_jsonl(path, qs)
        sets[s] = qs
    return sets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmfast eval pope", description="Poll a model on POPE and score it.")
    ap.add_argument("--model", required=True, help="model directory (config.json decides the adapter)")
    ap.add_argument("--adapter", default=None, help="adapter kind, overriding the config")
    ap.add_argument("--images", required=True, help="directory the questions' image names are relative to")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--questions", nargs="+", help="POPE question files (JSONL)")
    src.add_argument("--annotations", help="COCO instances JSON or {image, objects} JSONL to build from")
    ap.add_argument("--settings", nargs="+", default=list(pope.SETTINGS), choices=pope.SETTINGS)
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--num-positive", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default=pope.DEFAULT_TEMPLATE)
    ap.add_argument("--out", required=True, help="output directory (answers, questions, scores.json)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    ap.add_argument("--prompt-suffix", default=LLAVA_SUFFIX, help="appended to every question (LLaVA-1.5's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU)")
    ap.add_argument("--parser", choices=pope.PARSERS, default="pope")
    args = ap.parse_args(argv)
    try:
        sets = _question_sets(args)
        adapter = get_adapter(args.model, kind=args.adapter, device=args.device, dtype=args.dtype,
                              max_new_tokens=args.max_new_tokens)
        results = {}
        for name, qs in sets.items():
            apath = Path(args.out) / f"answers_{name}.jsonl"
            n = poll(adapter, qs, args.images, apath, args.batch_size, args.prompt_suffix,
                     log=lambda m: print(m, file=sys.stderr))
            print(f"{name}: answered {n} new, {len(qs) - n} already done", file=sys.stderr)
            results[name] = pope.score(qs, apath, parser=args.parser)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, ImportError) as e:
        print(f"mmfast eval pope: {e}", file=sys.stderr)
        return 2
    from mmfast.utils.io import atomic_write_json

    atomic_write_json(Path(args.out) / "scores.json", {
        "model": str(args.model), "adapter": adapter.kind, "parser": args.parser,
        "prompt_suffix": args.prompt_suffix, "results": results,
    })
    print(pope.format_table(results))
    return 0

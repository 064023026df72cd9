"""POPE (Li et al., EMNLP 2023): polling-based object probing for object hallucination.

Three parts, each usable on its own:

* ``build_questions`` turns object annotations into balanced yes/no question sets. It follows the
  paper's builder (images with at least ``num_positive`` objects; per image the first
  ``num_positive`` objects are asked, each followed by one absent object) but draws every random
  choice from a seeded generator and breaks ties by name, so the same seed gives the same file.
* ``score`` turns answers into TP/FP/TN/FN, accuracy, precision, recall, F1 and the yes-ratio.
  The default ``parser="pope"`` is the official rule, byte for byte in behaviour, so numbers are
  comparable with published tables.
* Polling a model (``mmfast eval pope``, through an adapter, see ``mmfast.eval.adapters``) lives
  in ``mmfast.eval.pope_poll`` (``main``), which builds on this module.

Question lines: ``{"question_id", "image", "text", "label"}`` (label "yes"/"no").
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SETTINGS = ("random", "popular", "adversarial")
DEFAULT_TEMPLATE = "Is there a {} in the image?"
PARSERS = ("pope", "strict")


# --------------------------------------------------------------------------- annotations
def _dedupe(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for it in items:
        seen.setdefault(it, None)
    return list(seen)


def _coco_to_objects(coco: Mapping[str, Any], source: str) -> list[dict]:
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise TypeError(f"{source}: a COCO instances file needs a list {key!r}")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: dict[Any, list[str]] = defaultdict(list)
    for a in coco["annotations"]:
        if a.get("category_id") not in names:
            raise ValueError(f"{source}: annotation {a.get('id')!r} has unknown category_id {a.get('category_id')!r}")
        per_image[a["image_id"]].append(names[a["category_id"]])
    # Objects keep their first-annotated order: the builder asks the first ``num_positive`` of them.
    return [
        {"image": im["file_name"], "image_id": im["id"], "objects": _dedupe(per_image.get(im["id"], []))}
        for im in coco["images"]
    ]


def load_annotations(annotations: Any) -> list[dict]:
    """Images and their objects as ``[{"image", "objects", ...}]``.

    ``annotations`` is a path to a COCO instances JSON or to POPE's ``{"image", "objects"}`` JSONL
    (a JSON list of such records also works), or those structures already in memory.
    """
    source = "annotations"
    if isinstance(annotations, (str, Path)):
        from mmfast.utils.io import read_json, read_jsonl

        source = str(annotations)
        p = Path(annotations)
        if not p.is_file():
            raise FileNotFoundError(f"annotations file not found: {p}")
        try:
            annotations = read_jsonl(p, what="annotations file")
        except ValueError:
            annotations = read_json(p, what="annotations file")  # pretty-printed JSON
        if len(annotations) == 1 and isinstance(annotations[0], (list, dict)) and (
            isinstance(annotations[0], list) or "annotations" in annotations[0]
        ):
            annotations = annotations[0]  # a one-line COCO file or JSON list
    if isinstance(annotations, Mapping):
        return _coco_to_objects(annotations, source)
    if not isinstance(annotations, list):
        raise TypeError(f"{source}: expected a COCO instances dict or a list of {{'image', 'objects'}} records")
    out = []
    for i, rec in enumerate(annotations, 1):
        if not isinstance(rec, Mapping) or "image" not in rec or not isinstance(rec.get("objects"), list):
            raise ValueError(f"{source} record {i}: expected {{'image': str, 'objects': [str, ...]}}, got {rec!r:.120}")
        out.append({**rec, "objects": _dedupe(str(o) for o in rec["objects"])})
    return out


# --------------------------------------------------------------------------- builder
def _article_template(template: str) -> str:
    """The template with the article before ``{}`` turned into "an" (and only that word)."""
    return re.sub(r"\b([Aa])(\s+)\{\}", lambda m: m.group(1) + "n" + m.group(2) + "{}", template, count=1)


def question_text(template: str, obj: str) -> str:
    """Fill ``template`` with ``obj``, writing "an" before a vowel; the rest of the template is untouched."""
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the object goes, got {template!r}")
    if obj and obj[0].lower() in "aeiou":
        template = _article_template(template)
    return template.format(obj)


def _cooccurrence(images: Sequence[dict]) -> dict[str, Counter]:
    co: dict[str, Counter] = defaultdict(Counter)
    for im in images:
        for a in im["objects"]:
            for b in im["objects"]:
                if a != b:
                    co[a][b] += 1
    return co


def _by_count(counter: Mapping[str, int]) -> list[str]:
    # Most frequent first; ties by name so the order never depends on dict insertion.
    return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def build_questions(
    annotations: Any,
    setting: str,
    num_images: int = 500,
    num_positive: int = 3,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
) -> list[dict]:
    """A POPE question set: ``num_images * num_positive * 2`` lines, yes/no alternating per image.

    ``setting`` picks the absent object asked after each positive: ``random`` (uniform over the
    known objects not in the image and not yet asked about it), ``popular`` (the most frequent such
    object over the sampled images) or ``adversarial`` (the one most often co-occurring with that
    positive over the sampled images); the last two fall back to random as the paper's code does.
    Known objects are those in the sampled images, as in the paper.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if num_images < 1 or num_positive < 1:
        raise ValueError(f"num_images and num_positive must be >= 1, got {num_images}, {num_positive}")
    question_text(template, "x")  # validates the template early
    records = load_annotations(annotations)
    eligible = [r for r in records if len(r["objects"]) >= num_positive]
    if len(eligible) < num_images:
        raise ValueError(
            f"only {len(eligible)} images have at least {num_positive} objects; num_images={num_images} asked for more"
        )
    rng = random.Random(seed)
    sampled = rng.sample(eligible, num_images)
    freq = Counter(o for im in sampled for o in im["objects"])
    vocab = sorted(freq)
    popular = _by_count(freq)
    co = {k: _by_count(v) for k, v in _cooccurrence(sampled).items()}

    questions: list[dict] = []
    for im in sampled:
        present = set(im["objects"])
        asked: set[str] = set()
        for pos in im["objects"][:num_positive]:
            asked.add(pos)
            ranked = popular if setting == "popular" else co.get(pos, []) if setting == "adversarial" else []
            neg = next((o for o in ranked if o not in present and o not in asked), None)
            if neg is None:
                pool = [o for o in vocab if o not in present and o not in asked]
                if not pool:
                    raise ValueError(
                        f"image {im['image']!r}: no known object is left to ask as a negative "
                        f"({len(vocab)} known objects); use more images or fewer positives"
                    )
                neg = rng.choice(pool)
            asked.add(neg)
            for obj, label in ((pos, "yes"), (neg, "no")):
                questions.append(
                    {"question_id": len(questions) + 1, "image": im["image"],
                     "text": question_text(template, obj), "label": label}
                )
    return questions


def write_jsonl(path: str | Path, rows: Iterable[Mapping]) -> None:
    from mmfast.utils.io import atomic_open

    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def object_of(text: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The object a question asks about (inverse of ``question_text``)."""
    pre, _, post = template.partition("{}")
    for p in (pre, _article_template(pre + "{}")[:-2]):
        if text.startswith(p) and text.endswith(post):
            return text[len(p): len(text) - len(post)]
    raise ValueError(f"question {text!r} does not follow template {template!r}")


# --------------------------------------------------------------------------- scoring
def parse_pope(text: str) -> str:
    """The official POPE rule: first sentence, commas dropped, split on single spaces;
    "no" if a word is exactly ``No``, ``not`` or ``no``, otherwise "yes" (even for empty text)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_strict(text: str) -> str:
    """Case-insensitive: the first whole word that is "yes" or "no" decides ("A cup, yes." is yes,
    "No, there is a dog." no); "other" when there is none ("Not really", "There is not one")."""
    m = re.search(r"\b(yes|no)\b", text, flags=re.IGNORECASE)
    return m.group(1).lower() if m else "other"


def load_lines(src: Any, what: str) -> tuple[list[dict], str | None]:
    if isinstance(src, (str, Path)):
        from mmfast.utils.io import read_jsonl

        p = Path(src)
        try:
            rows = read_jsonl(p, what=what)
        except ValueError:
            from mmfast.utils.io import read_json

            rows = read_json(p, what=what)  # a JSON list also works
        if len(rows) == 1 and isinstance(rows[0], list):
            rows = rows[0]  # a JSON list on one line
        if not isinstance(rows, list):
            raise TypeError(f"{what} {p}: expected JSON lines or a JSON list")
        return rows, str(p)
    return list(src), None


def _answer_text(a: Mapping, where: str) -> str:
    for key in ("text", "answer"):
        if isinstance(a.get(key), str):
            return a[key]
    raise ValueError(f"{where}: answer has no 'text' (LLaVA style) or 'answer' (POPE style) string: {dict(a)!r:.160}")


def join_answers(questions: Sequence[Mapping], answers: Sequence[Mapping], where: str = "answers") -> list[str]:
    """Answer texts in question order: by ``question_id`` when answers carry ids, else by position."""
    with_id = [("question_id" in a) for a in answers]
    if answers and any(with_id) and not all(with_id):
        raise ValueError(f"{where}: some answers have 'question_id' and some do not; cannot join them")
    if answers and all(with_id):
        qids = [q.get("question_id") for q in questions]
        if None in qids:
            raise ValueError(f"{where}: answers are keyed by question_id but a question has none")
        by_id: dict[Any, str] = {}
        for i, a in enumerate(answers, 1):
            qid = a["question_id"]
            if qid in by_id:
                raise ValueError(f"{where}: question_id {qid!r} is answered twice (line {i})")
            by_id[qid] = _answer_text(a, f"{where} line {i}")
        unknown = [k for k in by_id if k not in set(qids)]
        if unknown:
            raise ValueError(f"{where}: {len(unknown)} answers have question ids not in the questions, e.g. {unknown[:5]}")
        missing = [k for k in qids if k not in by_id]
        if missing:
            raise ValueError(
                f"{where}: {len(answers)} answers for {len(questions)} questions; unanswered ids e.g. {missing[:5]}"
            )
        return [by_id[k] for k in qids]
    if len(answers) != len(questions):
        raise ValueError(
            f"{where}: {len(answers)} answers without question_id for {len(questions)} questions; "
            "answers joined by order must match the questions one to one"
        )
    for i, (q, a) in enumerate(zip(questions, answers), 1):
        # POPE-style lines repeat the question: a shuffled or foreign file shows up here.
        if isinstance(a.get("question"), str) and isinstance(q.get("text"), str) and q["text"] not in a["question"]:
            raise ValueError(f"{where} line {i} answers {a['question']!r} but question {i} is {q['text']!r}")
    return [_answer_text(a, f"{where} line {i}") for i, a in enumerate(answers, 1)]


def metrics(preds: Sequence[str], labels: Sequence[str]) -> dict:
    """Confusion counts and rates, "yes" being the positive class.

    ``other`` predictions (strict parser) count as wrong: they lower accuracy and recall (recall is
    over all "yes" labels) but are neither TP/FP/TN/FN. Undefined ratios (no "yes" predicted) are 0.
    """
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels (> 0), got {len(preds)} and {len(labels)}")
    c = Counter(zip(preds, labels))
    tp, fp, tn, fn = c["yes", "yes"], c["yes", "no"], c["no", "no"], c["no", "yes"]
    n = len(labels)
    positives = sum(1 for lab in labels if lab == "yes")
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / positives if positives else 0.0
    out = {
        "n": n, "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        "accuracy": (tp + tn) / n, "precision": prec, "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "yes_ratio": sum(1 for p in preds if p == "yes") / n,
    }
    other = sum(1 for p in preds if p not in ("yes", "no"))
    if other:
        out["other"] = other
    return out


def score(questions: Any, answers: Any, parser: str = "pope") -> dict:
    """Score one setting. ``questions``/``answers`` are paths (JSONL or JSON list) or lists of dicts."""
    if parser not in PARSERS:
        raise ValueError(f"parser must be one of {PARSERS}, got {parser!r}")
    qs, qsrc = load_lines(questions, "questions file")
    ans, asrc = load_lines(answers, "answers file")
    for i, q in enumerate(qs, 1):
        if q.get("label") not in ("yes", "no"):
            raise ValueError(f"{qsrc or 'questions'} line {i}: label must be 'yes' or 'no', got {q.get('label')!r}")
    texts = join_answers(qs, ans, where=asrc or "answers")
    parse = parse_pope if parser == "pope" else parse_strict
    return metrics([parse(t) for t in texts], [q["label"] for q in qs])


def setting_name(path: str | Path) -> str:
    stem = Path(path).stem
    found = [s for s in SETTINGS if s in stem]
    return found[0] if len(found) == 1 else stem


def format_table(results: Mapping[str, Mapping]) -> str:
    """A table like the paper's: percentages with two decimals, one row per setting."""
    head = f"{'Setting':<14}{'Accuracy':>10}{'Precision':>11}{'Recall':>9}{'F1 Score':>10}{'Yes (%)':>9}"
    rows = [head, "-" * len(head)]
    for name, m in results.items():
        rows.append(
            f"{name:<14}{100 * m['accuracy']:>10.2f}{100 * m['precision']:>11.2f}{100 * m['recall']:>9.2f}"
            f"{100 * m['f1']:>10.2f}{100 * m['yes_ratio']:>9.2f}"
        )
    return "\n".join(rows)


def format_counts(results: Mapping[str, Mapping]) -> str:
    rows = [f"{'Setting':<14}{'TP':>7}{'FP':>7}{'TN':>7}{'FN':>7}{'other':>7}"]
    for name, m in results.items():
        rows.append(f"{name:<14}{m['TP']:>7}{m['FP']:>7}{m['TN']:>7}{m['FN']:>7}{m.get('other', 0):>7}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- command line
def build_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmfast eval pope build", description="Build POPE question files.")
    ap.add_argument("--annotations", required=True, help="COCO instances JSON or POPE {image, objects} JSONL")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--num-positive", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--prefix", default="pope", help="output files are OUT/PREFIX_SETTING.jsonl")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    try:
        records = load_annotations(args.annotations)
        for s in args.settings:
            qs = build_questions(records, s, args.num_images, args.num_positive, args.seed, args.template)
            path = Path(args.out) / f"{args.prefix}_{s}.jsonl"
            write_jsonl(path, qs)
            print(f"{path}: {len(qs)} questions ({s}, seed {args.seed})")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"mmfast eval pope build: {e}", file=sys.stderr)
        return 2
    return 0


def score_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mmfast eval pope score", description="Score POPE answers per setting.")
    ap.add_argument("--questions", nargs="+", required=True, help="question files, one per setting")
    ap.add_argument("--answers", nargs="+", required=True, help="answer files, in the same order")
    ap.add_argument("--parser", choices=PARSERS, default="pope")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    if len(args.questions) != len(args.answers):
        print(f"mmfast eval pope score: {len(args.questions)} question files but {len(args.answers)} answer files",
              file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    try:
        for q, a in zip(args.questions, args.answers):
            name = setting_name(q)
            if name in results:
                name = Path(q).stem
            results[name] = score(q, a, parser=args.parser)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"mmfast eval pope score: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
        print()
        print(format_counts(results))
    return 0


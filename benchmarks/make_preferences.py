"""Regenerate auto's preference table (mmfast/configs/backend_preferences.json) from benchmark CSVs.

    python benchmarks/make_preferences.py                 # every benchmarks/results/**/*.csv
    python benchmarks/make_preferences.py --check         # exit 1 when the committed table is stale

For each op, device family (sm90 for H100/H200, sm80 for A100, ..., cpu) and shape class (the op's
``shape_class``; attention: ``<mask>/<length bucket>/<train|infer>``) the backends are ordered by time, fastest
first, by the geometric mean of each backend's time relative to the fastest on each (card, case) it ran (a
case's rows: the median of their ``median_ms``). Each family also gets a ``*`` row: backends
ordered by the geometric mean of their relative time over the classes where they were measured (those
measured in at least half of the family's classes), and each kind of class (``decode/*``, ``causal/*``, ...: the
class up to its first ``/``) a row made the same way over that kind's classes; auto uses the kind's row, then
the ``*`` row, for classes the benchmarks never covered.
Training rows (``fwd+bwd``) make ``train`` classes, ``fwd`` rows ``infer`` classes; ops without a shape
class use their ``fwd+bwd`` rows. Rows with an error (skipped, unsupported, OOM) are left out.

The contrastive losses' classes are the logits' width K in powers of two (``k8k``, ``k32k``, ...), ranked
only where two or more of their backends ran side by side. Provider names map to backends per benchmark
(``PROVIDERS``); providers that are not one backend (an
``auto`` run, a variant with other options, a library we do not dispatch to) are ignored. FLCE's ``torch``
backend is never ranked: it holds the T×V logits the op exists to avoid; nor is the contrastive losses'
``reference`` (the N×N logits).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmfast.ops._dispatch import PREFERENCES_PATH, Facts

# bench -> (op, {provider: backend (per device type, "cuda" or "cpu")})
PROVIDERS = {
    "attention": ("flash_attention", {
        "mmfast": {"cuda": "triton", "cpu": "reference"},  # older CSVs: "mmfast" meant the device's default
        "mmfast-triton": "triton", "mmfast-reference": "reference", "mmfast-interpret": "triton_interpret",
        "mmfast-cpp": "cpp",
        "sdpa-cudnn": "sdpa_cudnn", "sdpa-flash": "sdpa_flash", "sdpa-efficient": "sdpa_efficient",
        "sdpa-math": "sdpa_math", "flex": "flex", "flash-attn": "flash_attn",
    }),
    "norm-layernorm": ("layer_norm", {"mmfast-triton": "triton", "torch-eager": "torch"}),
    "projection-layernorm": ("layer_norm", {"mmfast-triton": "triton", "torch-eager": "torch"}),  # older CSVs
    "projection-rmsnorm": ("rms_norm", {"mmfast-triton": "triton", "torch-eager": "torch"}),
    "projection-projector": ("mlp_projector", {"mmfast-triton": "triton", "torch-eager": "torch"}),
    "projection-l2": ("linear_l2_normalize", {"mmfast-triton": "triton", "torch-eager": "torch"}),
    "contrastive": ("clip_loss", {"mmfast-gemm": "gemm", "mmfast-triton": "triton", "mmfast-cpp": "cpp"}),
    "contrastive-siglip": ("siglip_loss", {"mmfast-gemm": "gemm", "mmfast-triton": "triton", "mmfast-cpp": "cpp"}),
}
# Ops ranked only where two or more of their backends were measured on the same card and class: a CSV that
# timed one backend alone (say the fused contrastive kernels, before the gemm backend existed) says nothing
# about the order.
NEEDS_RIVALS = {"clip_loss", "siglip_loss"}

# Card name (as the harness writes it) -> device family; anything else on CUDA is "cuda".
FAMILIES = [("H100", "sm90"), ("H200", "sm90"), ("H20", "sm90"), ("GH200", "sm90"), ("A100", "sm80"),
            ("A800", "sm80"), ("A10", "sm86"), ("A40", "sm86"), ("RTX 30", "sm86"), ("L4", "sm89"),
            ("L40", "sm89"), ("RTX 40", "sm89"), ("B200", "sm100"), ("V100", "sm70"), ("T4", "sm75")]


def family_of(device_name: str, device_type: str) -> str:
    if device_type != "cuda":
        return "cpu"
    for key, fam in FAMILIES:
        if key in device_name:
            return fam
    return "cuda"


def _params(s: str) -> dict:
    out = {}
    for kv in s.split(";"):
        if "=" in kv:
            k, v = kv.split("=", 1)
            out[k] = v
    return out


def _truthy(v) -> bool:
    return str(v) in ("True", "true", "1")


def attention_class(prm: dict, mode: str) -> str:
    from mmfast.ops.attention import shape_class

    s = int(prm.get("S", 0))
    extra = {"seqlen_q": s, "seqlen_k": s, "grad": mode != "fwd", "varlen": _truthy(prm.get("varlen"))}
    if _truthy(prm.get("decode")):
        extra.update(kvcache=True, seqlen_q=int(prm.get("S", 1)), seqlen_k=int(prm.get("cache", s)), grad=False)
    if prm.get("page") not in (None, "", "0", "None"):
        extra["paged"] = True
    if prm.get("prefix") not in (None, "", "0", "None"):
        extra["mask"] = "prefix"
    elif _truthy(prm.get("causal")):
        extra["mask"] = "causal"
    else:
        extra["mask"] = "full"
    return shape_class(Facts("cuda", torch.bfloat16, extra))


def collect(paths: list[str]):
    """{(op, family, class): {device: {backend: [ms, ...]}}} and the sources per key."""
    data: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    sources: dict = defaultdict(set)
    for path in paths:
        with open(path, newline="") as f:
            try:
                rows = list(csv.DictReader(f))
            except csv.Error:
                continue
        for r in rows:
            if "bench" not in r or r.get("error") or not r.get("median_ms"):
                continue
            spec = PROVIDERS.get(r["bench"])
            if spec is None:
                continue
            op, names = spec
            prm = _params(r.get("params", ""))
            dev_type = prm.get("device", "cuda" if "NVIDIA" in r.get("device", "") else "cpu")
            backend = names.get(r["provider"])
            if isinstance(backend, dict):
                backend = backend.get(dev_type)
            if backend is None:
                continue
            if dev_type == "cuda" and prm.get("dtype") not in (None, "bf16", "fp16"):
                continue  # the table is for the training dtypes
            if op == "flash_attention":
                cls = attention_class(prm, r["mode"])
            elif op in NEEDS_RIVALS:
                if r["mode"] != "fwd+bwd":
                    continue
                from mmfast.ops.contrastive import CLIP_OP

                cls = CLIP_OP.shape_class(Facts(dev_type, torch.bfloat16, {"k": int(prm.get("N", 0))}))
            else:
                if r["mode"] != "fwd+bwd":
                    continue
                cls = "*"
            fam = family_of(r.get("device", ""), dev_type)
            key = (op, fam, cls)
            # grouped per card and case: a backend is scored against the fastest on each case it ran, so one
            # that refuses a case of the class (SDPA on a paged cache) is not ranked on the easier cases alone
            data[key][(r.get("device", ""), prm.get("name", r.get("x", "")))][backend].append(float(r["median_ms"]))
            sources[key].add(os.path.relpath(path, ROOT))
    return data, sources


def _geo(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def rank(per_device: dict) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """Order backends by the geometric mean of their time relative to the fastest on each (card, case)."""
    ratios = defaultdict(list)
    ms = {}
    for _dev, by_backend in sorted(per_device.items()):
        med = {b: statistics.median(v) for b, v in by_backend.items()}
        best = min(med.values())
        for b, t in med.items():
            ratios[b].append(t / best)
            ms[b] = min(ms.get(b, math.inf), t)
    score = {b: _geo(r) for b, r in ratios.items()}
    order = sorted(score, key=lambda b: (score[b], ms[b]))
    return order, {b: round(ms[b], 4) for b in order}, score


def build(paths: list[str]) -> dict:
    data, sources = collect(paths)
    ops: dict = defaultdict(lambda: defaultdict(dict))
    family_scores: dict = defaultdict(lambda: defaultdict(list))
    for (op, fam, cls), per_device in sorted(data.items()):
        if op in NEEDS_RIVALS:
            per_device = {dev: by for dev, by in per_device.items() if len(by) >= 2}
            if not per_device:
                continue
        order, ms, score = rank(per_device)
        ops[op][fam][cls] = {"order": order, "ms": ms, "source": ", ".join(sorted(sources[(op, fam, cls)]))}
        if cls != "*":
            for b, s in score.items():
                family_scores[(op, fam, "*")][b].append(s)
                if "/" in cls:  # the class's kind (decode, causal, varlen-causal, ...) gets a row of its own
                    family_scores[(op, fam, cls.split("/")[0] + "/*")][b].append(s)
    for (op, fam, row), scores in family_scores.items():
        n_classes = len([c for c in ops[op][fam] if c != "*" and (row == "*" or c.startswith(row[:-1]))])
        keep = {b: _geo(s) for b, s in scores.items() if 2 * len(s) >= n_classes}
        if keep and row not in ops[op][fam]:
            ops[op][fam][row] = {"order": sorted(keep, key=keep.get),
                                 "note": f"geometric mean over {n_classes} measured classes"}
    return {
        "version": 1,
        "generated_by": "benchmarks/make_preferences.py",
        "doc": "auto's order per op, device family and shape class, fastest first (see mmfast/ops/_dispatch.py)",
        "ops": json.loads(json.dumps(ops, sort_keys=True)),
    }


def rule_report(paths: list[str], slack: float = 1.03) -> tuple[list[str], int]:
    """The rule auto is held to: on each measured (card, case, mode), ``mmfast-auto`` <= ``slack`` x the
    fastest provider that is one of the op's backends. Returns report lines and the number of violations."""
    groups: dict = defaultdict(dict)
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("bench") != "attention" or r.get("error") or not r.get("median_ms"):
                    continue
                prm = _params(r.get("params", ""))
                key = (r.get("device", ""), prm.get("name", r.get("x")), r["mode"])
                groups[key][r["provider"]] = float(r["median_ms"])
    lines, bad = [], 0
    names = PROVIDERS["attention"][1]
    for (dev, case, mode), by in sorted(groups.items()):
        if "mmfast-auto" not in by:
            continue
        rivals = {p: t for p, t in by.items() if p in names}
        if not rivals:
            continue
        best = min(rivals, key=rivals.get)
        ratio = by["mmfast-auto"] / rivals[best]
        ok = ratio <= slack
        bad += not ok
        lines.append(f"{'ok  ' if ok else 'SLOW'} {dev} {case} {mode}: auto {by['mmfast-auto']:.3f} ms, fastest "
                     f"{best} {rivals[best]:.3f} ms ({ratio:.3f}x)")
    return lines, bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder searched for *.csv")
    ap.add_argument("--out", default=str(PREFERENCES_PATH))
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    ap.add_argument("--rule", action="store_true",
                    help="report auto vs the fastest backend per measured attention case (exit 1 past 1.03x)")
    args = ap.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.results, "**", "*.csv"), recursive=True))
    if args.rule:
        lines, bad = rule_report(paths)
        print("\n".join(lines) if lines else "no mmfast-auto rows in these CSVs")
        return 1 if bad else 0
    table = build(paths)
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    if args.check:
        old = Path(args.out).read_text() if Path(args.out).exists() else ""
        if old != text:
            print(f"{args.out} is stale: run python benchmarks/make_preferences.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(paths)} CSVs)")
        return 0
    Path(args.out).write_text(text)
    n = sum(len(c) for fams in table["ops"].values() for c in fams.values())
    print(f"wrote {args.out}: {n} rows from {len(paths)} CSVs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

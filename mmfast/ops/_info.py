"""``mmfast info``: every op's backends on this machine and why each was refused; ``--explain OP`` for one
call (the facts, the shape class, the preference-table row, the choice and every refusal)."""
from __future__ import annotations

import contextlib
import importlib

import torch

from mmfast.ops._backend import Facts, _dtype_name
from mmfast.ops._dispatch import PREFERENCES_PATH, registered_ops
from mmfast.ops._env import _INTERPRET_AT_IMPORT, env, fake_env


def info_lines() -> list[str]:
    e = env()
    lines = [f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as ex:  # noqa: BLE001 - `mmfast info` reports whatever failed
        lines.append(f"triton: not importable ({type(ex).__name__})")
    lines.append(f"TRITON_INTERPRET at import: {'1' if _INTERPRET_AT_IMPORT else 'unset'}")
    lines.append("mmfast._C: " + ("loaded" if e.cpp_error is None else e.cpp_error))
    cuda = e.cuda_available
    lines.append("cuda: " + (f"{torch.cuda.get_device_name(0)} ({e.arch})" if cuda else "not available"))
    lines.append(f"preference table: {PREFERENCES_PATH}")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for name, op in sorted(registered_ops().items()):
        for dev in devices:
            facts = op.example(dev) if op.example else Facts(dev, torch.float32)
            lines.append(f"\n{name} [{dev}, {_dtype_name(facts.dtype)}]")
            order, _ = op.candidates(facts)
            lines += op.verdict_lines(facts, order, "available (lower priority)")
    return lines


# Ops with an `--explain` parser: op name (or alias) -> "module:function" turning argv into Facts.
EXPLAIN_PARSERS = {
    "attention": "mmfast.ops.attention:explain_facts",
    "flash_attention": "mmfast.ops.attention:explain_facts",
    "clip_loss": "mmfast.ops.contrastive:explain_clip",
    "siglip_loss": "mmfast.ops.contrastive:explain_siglip",
}


def info_main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        if argv:
            print("usage: mmfast info [--explain OP [--shape ...] [--family sm90] ...]\n\n"
                  "Without arguments: every op's backends on this machine, and why each was refused.\n"
                  "--explain OP ...: the backend auto picks for one call and every refusal; "
                  f"OP one of {sorted(EXPLAIN_PARSERS)} or any registered op name "
                  "(`mmfast info --explain attention --help` lists the call's options).")
            return 0
        print("\n".join(info_lines()))
        return 0
    p = argparse.ArgumentParser(prog="mmfast info", add_help=False)
    p.add_argument("--explain", required=True)
    args, rest = p.parse_known_args(argv)
    op_name = args.explain
    parser = EXPLAIN_PARSERS.get(op_name)
    if parser is not None:
        mod, _, fn = parser.partition(":")
        facts, op_name, fake = getattr(importlib.import_module(mod), fn)(rest)
    else:
        ops = registered_ops()
        if op_name not in ops:
            print(f"mmfast info: unknown op {op_name!r}; choose from {sorted(set(ops) | set(EXPLAIN_PARSERS))}")
            return 2
        q = argparse.ArgumentParser(prog=f"mmfast info --explain {op_name}")
        q.add_argument("--device", default="cpu")
        q.add_argument("--dtype", default="float32")
        q.add_argument("--family", help="pretend the CUDA card is of this family (sm90, sm80, ...)")
        a = q.parse_args(rest)
        facts = ops[op_name].example(a.device) if ops[op_name].example else Facts(a.device, torch.float32)
        facts = Facts(a.device, getattr(torch, a.dtype), facts.extra)
        fake = {"cuda_available": True, "arch": a.family} if a.family else {}
    op = registered_ops()[op_name]
    with fake_env(**fake) if fake else contextlib.nullcontext():
        print("\n".join(op.explain(facts)))
    return 0

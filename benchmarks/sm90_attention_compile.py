"""Compile mmfast's attention kernels for sm_90 (H100/H200) without a GPU; report registers, spills, shared memory.

    python benchmarks/sm90_attention_compile.py              # the fixed configs the library launches
    python benchmarks/sm90_attention_compile.py --tiles      # also larger Hopper tiles (candidates for tuning)
    python benchmarks/sm90_attention_compile.py --csv out.csv

Triton compiles each kernel (forward, backward dK/dV, backward dQ) for ``GPUTarget("cuda", 90, 32)`` with the
bf16 dtypes, per head dim (64, 128) and mask (full, causal, prefix-LM), and ``cuobjdump -res-usage`` reads the
cubin's registers per thread, spill stores/loads (``STACK``/local memory) and shared memory. Exit status 1
when a fixed config spills or does not compile. What this cannot say: speed (that needs the card).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

import mmfast.ops._attention_triton as F
import mmfast.ops._attention_triton_bwd as B

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
MASKS = {"full": {"BAND": False, "HAS_PREFIX": False}, "causal": {"BAND": True, "HAS_PREFIX": False},
         "prefix": {"BAND": True, "HAS_PREFIX": True}}
OFF = {"IS_VARLEN": False, "HAS_SEQUSED": False, "HAS_SOFTCAP": False, "HAS_DROPOUT": False, "HAS_ALIBI": False,
       "UPCAST": False, "DOT_PREC": "tf32"}
FWD_OFF = {"HAS_KV_IDX": False, "HAS_LEFTPAD": False, "PAGED": False}
FLOATS = {"sm_scale", "softcap", "dropout_p"}
TENSORS_BF16 = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
TENSORS_F32 = {"LSE", "MROW", "ILROW", "DELTA", "ALIBI"}
TENSORS_I32 = {"CU_Q", "CU_K", "SEQUSED_K", "PREFIX", "KV_IDX", "LEFTPAD", "BLOCK_TABLE"}


def _signature(kernel, consts):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in TENSORS_BF16:
            sig[name] = "*bf16"
        elif name in TENSORS_F32:
            sig[name] = "*fp32"
        elif name in TENSORS_I32:
            sig[name] = "*i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, consts, warps, stages):
    fn = kernel  # the JITFunction (ASTSource reads its arg_names)
    src = ASTSource(fn, _signature(fn, consts), {(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1)) if "LOCAL:" in usage else 0
    shared = k.metadata.shared
    return {"registers": reg, "stack_bytes": stack, "local_bytes": local, "shared_bytes": shared}


def configs(tiles: bool, head_dims=(64, 128), masks=tuple(MASKS)):
    for d in head_dims:
        bd = F.block_d(d)
        fixed = {"fwd": F.fixed_config("fwd", d, torch.bfloat16), "bwd": F.fixed_config("bwd", d, torch.bfloat16)}
        for mask in masks:
            yield "fwd", d, bd, mask, fixed["fwd"], True
            yield "bwd_dkdv", d, bd, mask, fixed["bwd"], True
            yield "bwd_dq", d, bd, mask, fixed["bwd"], True
            if tiles:
                for cfg in ((128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)):
                    yield "fwd", d, bd, mask, cfg, False
                for cfg in ((64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2)):
                    yield "bwd_dkdv", d, bd, mask, cfg, False
                for cfg in ((64, 64, 8, 2), (128, 64, 8, 2)):
                    yield "bwd_dq", d, bd, mask, cfg, False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", action="store_true", help="also try larger Hopper tiles")
    ap.add_argument("--csv", help="write the table here")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--masks", default=",".join(MASKS))
    ap.add_argument("--kernels", default="fwd,bwd_dkdv,bwd_dq")
    args = ap.parse_args(argv)
    head_dims = tuple(int(x) for x in args.head_dims.split(","))
    masks = tuple(args.masks.split(","))
    only = set(args.kernels.split(","))
    kernels = {"fwd": (F._fwd_kernel, FWD_OFF), "bwd_dkdv": (B._dkdv_kernel, {}), "bwd_dq": (B._dq_kernel, {})}
    rows, bad = [], 0
    print(f"{'kernel':<9} {'D':>4} {'mask':<7} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6}  "
          f"{'regs':>5} {'spill':>6} {'smem KiB':>8}  fixed")
    for name, d, bd, mask, (bm, bn, warps, stages), fixed in configs(args.tiles, head_dims, masks):
        if name not in only:
            continue
        kernel, extra = kernels[name]
        consts = {**OFF, **extra, **MASKS[mask], "BLOCK_D": bd, "BLOCK_M": bm, "BLOCK_N": bn}
        try:
            r = compile_one(kernel, consts, warps, stages)
            err = ""
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a row, not a crash
            r, err = {"registers": -1, "stack_bytes": -1, "local_bytes": -1, "shared_bytes": -1}, str(e)[:80]
        row = {"kernel": name, "head_dim": d, "mask": mask, "block_m": bm, "block_n": bn, "warps": warps,
               "stages": stages, **r, "fixed": fixed, "error": err}
        rows.append(row)
        spill = r["stack_bytes"] + max(0, r["local_bytes"])
        if fixed and (err or spill):
            bad += 1
        print(f"{name:<9} {d:>4} {mask:<7} {bm:>4} {bn:>4} {warps:>5} {stages:>6}  {r['registers']:>5} "
              f"{spill:>6} {r['shared_bytes'] / 1024:>8.1f}  {'yes' if fixed else ''} {err}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

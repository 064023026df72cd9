"""``mmfast bench attention``: mmfast flash attention against PyTorch SDPA, FlexAttention and flash-attn.

Shapes (GPU): ViT-B/16 (B256 S197 H12 D64), ViT-L/14-336 (B64 S577 H16 D64), LLaVA 2k causal
(B8 S2048 H32 D128), LLaMA 4k causal (B4 S4096 H32 D128), a prefix-LM batch (576 image tokens + 1024
text, B8 H32 D128) and a varlen causal batch (16 sequences, 64..2048 tokens, H32 D128). bf16.
Modes: ``fwd`` (no autograd) and ``fwd+bwd`` (forward, then ``torch.autograd.grad`` for q, k, v).

Providers: ``mmfast`` (the Triton kernels on CUDA; the reference backend on CPU), ``sdpa-flash``,
``sdpa-efficient``, ``sdpa-cudnn`` (``torch.nn.attention.sdpa_kernel`` pinned to one backend; the
prefix mask goes in as a boolean mask, which the flash and cuDNN backends refuse), ``sdpa`` (CPU:
PyTorch's choice), ``flex`` (``flex_attention`` under ``torch.compile`` with a block mask) and
``flash-attn`` when installed. Varlen rows: mmfast, flash-attn and flex (document mask) only.

FLOPs: 4·D·(visible query-key pairs) per head for the forward (two matmuls), 2.5× that for the
backward (five matmuls, FA2's convention), so ``fwd+bwd`` = 3.5 × ``fwd``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmfast.bench import harness

GPU_CASES = [
    {"name": "vit_b16", "B": 256, "S": 197, "H": 12, "D": 64, "causal": False},
    {"name": "vit_l14_336", "B": 64, "S": 577, "H": 16, "D": 64, "causal": False},
    {"name": "llava_2k", "B": 8, "S": 2048, "H": 32, "D": 128, "causal": True},
    {"name": "llama_4k", "B": 4, "S": 4096, "H": 32, "D": 128, "causal": True},
    {"name": "prefix_lm", "B": 8, "S": 1600, "H": 32, "D": 128, "causal": True, "prefix": 576},
    {"name": "varlen", "B": 16, "S": 2048, "H": 32, "D": 128, "causal": True, "varlen": True},
]
CPU_CASES = [
    {"name": "vit_tiny", "B": 2, "S": 197, "H": 2, "D": 64, "causal": False},
    {"name": "causal_tiny", "B": 1, "S": 512, "H": 2, "D": 64, "causal": True},
    {"name": "prefix_tiny", "B": 1, "S": 320, "H": 2, "D": 64, "causal": True, "prefix": 64},
    {"name": "varlen_tiny", "B": 4, "S": 256, "H": 2, "D": 64, "causal": True, "varlen": True},
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def varlen_lengths(case: dict) -> list[int]:
    """Deterministic sequence lengths in [S/32, S] for the varlen case."""
    g = torch.Generator().manual_seed(case["B"] * 7919 + case["S"])
    return torch.randint(max(1, case["S"] // 32), case["S"] + 1, (case["B"],), generator=g).tolist()


def visible_pairs(case: dict) -> float:
    """Visible (query, key) pairs summed over the batch (one head)."""
    if case.get("varlen"):
        lens = varlen_lengths(case)
        return float(sum(n * (n + 1) / 2 if case["causal"] else n * n for n in lens))
    s = case["S"]
    pairs = s * (s + 1) / 2 if case["causal"] else s * s
    p = case.get("prefix", 0)
    return case["B"] * (pairs + p * (p - 1) / 2)


def flops(case: dict, mode: str) -> float:
    fwd = 4.0 * case["D"] * case["H"] * visible_pairs(case)
    return fwd if mode == "fwd" else 3.5 * fwd


# --------------------------------------------------------------------------- inputs
def _dense(case: dict, layout: str):
    """q, k, v in (B, S, H, D) (``bshd``) or (B, H, S, D) (``bhsd``), contiguous, requiring grad."""
    g = torch.Generator(device=case["device"]).manual_seed(0)
    shape = (case["B"], case["S"], case["H"], case["D"])
    dt = DTYPES[case["dtype"]]
    out = []
    for _ in range(3):
        t = torch.randn(shape, generator=g, device=case["device"], dtype=dt)
        if layout == "bhsd":
            t = t.transpose(1, 2).contiguous()
        out.append(t.requires_grad_())
    return out


def _packed(case: dict):
    lens = varlen_lengths(case)
    total = sum(lens)
    g = torch.Generator(device=case["device"]).manual_seed(0)
    dt = DTYPES[case["dtype"]]
    qkv = [torch.randn((total, case["H"], case["D"]), generator=g, device=case["device"], dtype=dt).requires_grad_()
           for _ in range(3)]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=case["device"])
    return qkv, cu, max(lens)


def _step(fn, inputs, mode):
    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(*inputs)
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    return step


# --------------------------------------------------------------------------- providers
def _mmfast(case, mode):
    from mmfast.ops.attention import flash_attn_func, flash_attn_varlen_func

    backend = "triton" if case["device"] == "cuda" else "reference"
    if case.get("varlen"):
        qkv, cu, mx = _packed(case)
        return _step(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=case["causal"],
                                                            backend=backend), qkv, mode)
    prefix = case.get("prefix")
    return _step(lambda q, k, v: flash_attn_func(q, k, v, causal=case["causal"], prefix_len=prefix, backend=backend),
                 _dense(case, "bshd"), mode)


def _prefix_mask(case):
    s, p = case["S"], case["prefix"]
    i = torch.arange(s, device=case["device"])
    return (i[None, :] <= i[:, None]) | ((i[:, None] < p) & (i[None, :] < p))  # (S, S) True = attend


def _sdpa(kernel: str | None):
    def setup(case, mode):
        import torch.nn.functional as F

        if case.get("varlen"):
            raise RuntimeError("SDPA has no packed-sequence (varlen) entry point")
        if kernel is not None and case["device"] != "cuda":
            raise RuntimeError(f"sdpa-{kernel} needs CUDA")
        mask = _prefix_mask(case) if case.get("prefix") else None
        causal = case["causal"] and mask is None

        def fn(q, k, v):
            if kernel is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION}
            with sdpa_kernel(backends[kernel]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

        return _step(fn, _dense(case, "bhsd"), mode)

    return setup


def _flex(case, mode):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = case["device"]
    compiled = torch.compile(flex_attention, dynamic=False)
    if case.get("varlen"):
        (q, k, v), cu, _ = _packed(case)
        doc = torch.repeat_interleave(torch.arange(case["B"], device=dev), cu.diff().long())  # (T,)

        def doc_mask(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        total = q.shape[0]
        block = create_block_mask(doc_mask, None, None, total, total, device=dev)
        inputs = [t.detach().transpose(0, 1)[None].contiguous().requires_grad_() for t in (q, k, v)]  # (1, H, T, D)
        return _step(lambda q, k, v: compiled(q, k, v, block_mask=block), inputs, mode)
    prefix = case.get("prefix", 0)
    causal = case["causal"]

    def mask_mod(b, h, qi, ki):
        if not causal:
            return qi >= 0
        return (qi >= ki) | ((qi < prefix) & (ki < prefix))

    block = create_block_mask(mask_mod, None, None, case["S"], case["S"], device=dev)
    return _step(lambda q, k, v: compiled(q, k, v, block_mask=block), _dense(case, "bhsd"), mode)


def _flash_attn(case, mode):
    if case["device"] != "cuda":
        raise RuntimeError("flash-attn runs on CUDA only")
    import flash_attn

    if case.get("prefix"):
        raise RuntimeError("flash-attn has no prefix-LM mask")
    if case.get("varlen"):
        qkv, cu, mx = _packed(case)
        return _step(lambda q, k, v: flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=case["causal"]),
                     qkv, mode)
    return _step(lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=case["causal"]), _dense(case, "bshd"), mode)


def providers(device: str, names: list[str] | None = None) -> dict:
    table = {"mmfast": _mmfast}
    if device == "cuda":
        table.update({"sdpa-flash": _sdpa("flash"), "sdpa-efficient": _sdpa("efficient"),
                      "sdpa-cudnn": _sdpa("cudnn"), "flash-attn": _flash_attn})
    else:
        table["sdpa"] = _sdpa(None)
    table["flex"] = _flex  # compiles per shape: last under --budget-s
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"unknown provider(s) {unknown}; choose from {list(table)}")
        table = {n: table[n] for n in names}
    return table


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfast bench attention", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, "attention")
    p.add_argument("--quick", action="store_true", help="only the first cases (GPU: ViT-B and LLaVA 2k)")
    p.add_argument("--cases", help="comma-separated case names (see the module docstring)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = harness.pick_device(args, "mmfast bench attention")
    if device is None:
        return 2
    gpu = device == "cuda"
    base = GPU_CASES if gpu else CPU_CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        known = {c["name"]: c for c in GPU_CASES + CPU_CASES}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            print(f"unknown case(s) {unknown}; choose from {list(known)}", file=sys.stderr)
            return 2
        base = [known[w] for w in wanted]
    elif args.quick:
        base = [base[0], base[2]] if gpu else base[:2]
    modes = harness.modes_of(args)
    if modes is None:
        return 2
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    names = harness.provider_names(args)
    if names is None and not gpu and args.quick:
        names = ["mmfast", "sdpa"]  # flex compiles for minutes on CPU
    table = providers(device, names)
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"attention_{harness.device_slug(device)}.csv"
    # The harness plots against one integer axis: the case's index in this sweep (names in `params`).
    cases = [{**c, "case": i, "dtype": dtype, "device": device} for i, c in enumerate(base)]
    rows = harness.run(
        "attention", table, cases, x_key="case", device=device, modes=modes, flops=flops,
        budget_s=args.budget_s, out_csv=out, plot=not args.no_plot,
        **({"reps": 2, "max_s": 3.0} if not gpu else {}),
    )
    return 0 if any(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

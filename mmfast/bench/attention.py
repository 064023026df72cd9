"""``mmfast bench attention``: every attention backend side by side: mmfast's Triton kernels, mmfast's
``auto`` choice, PyTorch SDPA (cuDNN / flash / efficient / math), FlexAttention and flash-attn.

Shapes (GPU, bf16): ViT-B/16 (B256 S197 H12 D64), ViT-L/14-336 (B64 S577 H16 D64), LLaVA 2k causal
(B8 S2048 H32 D128), LLaMA 4k causal (B4 S4096 H32 D128), a prefix-LM batch (576 bidirectional image
tokens then causal text, S2048 B8 H32 D128), a varlen causal batch (16 sequences, 64..2048 tokens,
H32 D128) and decode (``flash_attn_with_kvcache``: B16, one new token against a 4096-token cache, H32,
KV heads 8, D128), once on a contiguous cache and once paged (256-token pages through ``block_table``).
Modes: ``fwd`` (no autograd) and ``fwd+bwd`` (forward, then ``torch.autograd.grad`` for q, k, v);
decode is forward only.

Providers: ``mmfast-triton`` (the Triton kernels, forced; on CPU the reference backend, ``mmfast-reference``,
and the C++ kernels of the kv-cache and varlen calls, ``mmfast-cpp``), ``mmfast-auto`` (``backend=None``: what the dispatcher picks from the preference
table; the rule is auto <= 1.03x the fastest provider that supports the call), ``sdpa-cudnn``,
``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math`` (``torch.nn.attention.sdpa_kernel`` pinned to one kernel;
masks SDPA's flag cannot express go in as a dense boolean mask, which flash and cuDNN refuse), ``sdpa``
(PyTorch's own choice), ``flex`` (``flex_attention`` under ``torch.compile`` with a block mask, one compiled
function per mask kind) and ``flash-attn`` when installed. Varlen: mmfast, flash-attn and flex (document
mask). Decode: mmfast, SDPA on the same cache (GQA through ``enable_gqa``; cuDNN and efficient get k/v
heads expanded in the untimed setup), flash-attn (``flash_attn_with_kvcache``, paged via ``block_table``).

FLOPs: flash-attn's benchmark formula, ``4·B·S²·H·D`` for the forward, halved when causal (the prefix-LM
mask counts as causal; varlen sums over sequences; decode ``4·B·Sk·H·D``), and 2.5x that for the backward,
so ``fwd+bwd`` = 3.5x ``fwd``. On CUDA each case also records ``gemm_tflops``, the card's measured bf16 GEMM
rate (8192³ matmul) in the same process, so a row's TFLOP/s can be read as a percent of it.
"""
from __future__ import annotations

import argparse
import sys

import torch

from mmfast.bench import harness

GPU_CASES = [
    {"name": "vit_b16", "B": 256, "S": 197, "H": 12, "D": 64, "causal": False},
    {"name": "vit_l14_336", "B": 64, "S": 577, "H": 16, "D": 64, "causal": False},
    {"name": "llava_2k", "B": 8, "S": 2048, "H": 32, "D": 128, "causal": True},
    {"name": "llama_4k", "B": 4, "S": 4096, "H": 32, "D": 128, "causal": True},
    {"name": "prefix_lm", "B": 8, "S": 2048, "H": 32, "D": 128, "causal": True, "prefix": 576},
    {"name": "varlen", "B": 16, "S": 2048, "H": 32, "D": 128, "causal": True, "varlen": True},
    {"name": "decode", "B": 16, "S": 1, "cache": 4096, "H": 32, "HK": 8, "D": 128, "causal": True, "decode": True},
    {"name": "decode_paged", "B": 16, "S": 1, "cache": 4096, "H": 32, "HK": 8, "D": 128, "causal": True,
     "decode": True, "page": 256},
]
CPU_CASES = [
    {"name": "vit_tiny", "B": 2, "S": 197, "H": 2, "D": 64, "causal": False},
    {"name": "llava_tiny", "B": 8, "S": 128, "H": 4, "D": 32, "causal": True},  # the tiny LLaVA's LLM in training
    {"name": "causal_tiny", "B": 1, "S": 512, "H": 2, "D": 64, "causal": True},
    {"name": "prefix_tiny", "B": 1, "S": 320, "H": 2, "D": 64, "causal": True, "prefix": 64},
    {"name": "varlen_tiny", "B": 4, "S": 256, "H": 2, "D": 64, "causal": True, "varlen": True},
    {"name": "decode_tiny", "B": 4, "S": 1, "cache": 512, "H": 4, "HK": 2, "D": 64, "causal": True, "decode": True},
    {"name": "decode_paged_tiny", "B": 4, "S": 1, "cache": 512, "H": 4, "HK": 2, "D": 64, "causal": True,
     "decode": True, "page": 64},
]
DTYPES = harness.DTYPES


def varlen_lengths(case: dict) -> list[int]:
    """Deterministic sequence lengths in [S/32, S] for the varlen case."""
    g = torch.Generator().manual_seed(case["B"] * 7919 + case["S"])
    return torch.randint(max(1, case["S"] // 32), case["S"] + 1, (case["B"],), generator=g).tolist()


def flops(case: dict, mode: str) -> float:
    """flash-attn's formula (see the module docstring)."""
    h, d = case["H"], case["D"]
    if case.get("decode"):
        return 4.0 * case["B"] * case["S"] * case["cache"] * h * d
    div = 2.0 if case["causal"] else 1.0
    if case.get("varlen"):
        fwd = sum(4.0 * n * n * h * d / div for n in varlen_lengths(case))
    else:
        fwd = 4.0 * case["B"] * case["S"] ** 2 * h * d / div
    return fwd if mode == "fwd" else 3.5 * fwd


def gemm_tflops(device: str) -> float | None:
    """The card's bf16 GEMM rate (TFLOP/s) on an 8192³ matmul, median of triton's do_bench; None off CUDA."""
    if device != "cuda":
        return None
    import triton

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


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


def _cache(case: dict):
    """Decode inputs: q (B, 1, H, D), a full k/v cache (B, cache, HK, D) or its paged form
    (num_pages, page, HK, D) with a shuffled block table (B, cache / page), and the lengths (B,)."""
    g = torch.Generator(device=case["device"]).manual_seed(0)
    dev, dt = case["device"], DTYPES[case["dtype"]]
    b, n, hk, d = case["B"], case["cache"], case["HK"], case["D"]
    q = torch.randn((b, case["S"], case["H"], d), generator=g, device=dev, dtype=dt)
    k = torch.randn((b, n, hk, d), generator=g, device=dev, dtype=dt)
    v = torch.randn((b, n, hk, d), generator=g, device=dev, dtype=dt)
    lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    page = case.get("page")
    if not page:
        return q, k, v, lens, None
    per_seq = n // page
    perm = torch.randperm(b * per_seq, generator=torch.Generator().manual_seed(1)).to(dev)
    table = perm.reshape(b, per_seq).to(torch.int32)
    kp = torch.empty((b * per_seq, page, hk, d), device=dev, dtype=dt)
    vp = torch.empty_like(kp)
    kp[table.long()] = k.reshape(b, per_seq, page, hk, d)
    vp[table.long()] = v.reshape(b, per_seq, page, hk, d)
    return q, kp, vp, lens, table


def _forward_only(mode):
    if mode != "fwd":
        raise RuntimeError("decode is forward only (no autograd)")


def _mmfast(backend_of_device):
    def setup(case, mode):
        from mmfast.ops.attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

        backend = backend_of_device(case["device"])
        if case.get("decode"):
            _forward_only(mode)
            q, k, v, lens, table = _cache(case)
            return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table, causal=True,
                                                   backend=backend)
        if case.get("varlen"):
            qkv, cu, mx = _packed(case)
            return _step(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=case["causal"],
                                                                backend=backend), qkv, mode)
        prefix = case.get("prefix")
        return _step(lambda q, k, v: flash_attn_func(q, k, v, causal=case["causal"], prefix_len=prefix,
                                                     backend=backend), _dense(case, "bshd"), mode)

    return setup


def _prefix_mask(case):
    s, p = case["S"], case["prefix"]
    i = torch.arange(s, device=case["device"])
    return (i[None, :] <= i[:, None]) | ((i[:, None] < p) & (i[None, :] < p))  # (S, S) True = attend


_SDPA_GQA = {None: True, "flash": True, "math": True, "efficient": False, "cudnn": False}


def _sdpa(kernel: str | None):
    def setup(case, mode):
        import torch.nn.functional as F

        if case.get("varlen"):
            raise RuntimeError("SDPA has no packed-sequence (varlen) entry point")
        if kernel in ("cudnn", "efficient") and case["device"] != "cuda":
            raise RuntimeError(f"sdpa-{kernel} needs CUDA")

        def call(q, k, v, mask, causal, gqa):
            if kernel is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
            with sdpa_kernel(backends[kernel]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

        if case.get("decode"):
            _forward_only(mode)
            if case.get("page"):
                raise RuntimeError("SDPA takes no paged k/v (block_table)")
            q, k, v, _lens, _ = _cache(case)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # views: the same cache
            gqa = _SDPA_GQA[kernel]
            if not gqa:  # this kernel has no GQA: k/v heads expanded in the untimed setup
                rep = case["H"] // case["HK"]
                kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)

            def run():
                with torch.no_grad():
                    return call(qt, kt, vt, None, False, gqa)  # one new token sees the whole cache

            return run
        mask = _prefix_mask(case) if case.get("prefix") else None
        causal = case["causal"] and mask is None
        return _step(lambda q, k, v: call(q, k, v, mask, causal, False), _dense(case, "bhsd"), mode)

    return setup


_FLEX_COMPILED: dict = {}


def _flex_fn(kind: str):
    """flex_attention compiled once per mask kind (dynamic shapes: the compile is reused across shapes)."""
    from torch.nn.attention.flex_attention import flex_attention

    if kind not in _FLEX_COMPILED:
        # dynamic: one compile per mask kind serves every shape (and the warm-up's small one)
        _FLEX_COMPILED[kind] = torch.compile(flex_attention, dynamic=True)
    return _FLEX_COMPILED[kind]


def _flex(case, mode):
    from torch.nn.attention.flex_attention import create_block_mask

    dev = case["device"]
    if case.get("decode"):
        raise RuntimeError("not measured: FlexAttention decode needs its own paged/decode set-up")
    if case.get("varlen"):
        (q, k, v), cu, _ = _packed(case)
        doc = torch.repeat_interleave(torch.arange(case["B"], device=dev), cu.diff().long())  # (T,)

        def doc_mask(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        total = q.shape[0]
        block = create_block_mask(doc_mask, None, None, total, total, device=dev)
        inputs = [t.detach().transpose(0, 1)[None].contiguous().requires_grad_() for t in (q, k, v)]  # (1, H, T, D)
        fn = _flex_fn("varlen")
        return _step(lambda q, k, v: fn(q, k, v, block_mask=block), inputs, mode)
    prefix = case.get("prefix", 0)
    causal = case["causal"]

    def mask_mod(b, h, qi, ki):
        if not causal:
            return qi >= 0
        return (qi >= ki) | ((qi < prefix) & (ki < prefix))

    block = create_block_mask(mask_mod, None, None, case["S"], case["S"], device=dev)
    fn = _flex_fn("prefix" if prefix else "causal" if causal else "full")
    return _step(lambda q, k, v: fn(q, k, v, block_mask=block), _dense(case, "bhsd"), mode)


def _flash_attn(case, mode):
    if case["device"] != "cuda":
        raise RuntimeError("flash-attn runs on CUDA only")
    import flash_attn

    if case.get("decode"):
        _forward_only(mode)
        q, k, v, lens, table = _cache(case)
        return lambda: flash_attn.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table, causal=True)
    if case.get("prefix"):
        raise RuntimeError("flash-attn has no prefix-LM mask")
    if case.get("varlen"):
        qkv, cu, mx = _packed(case)
        return _step(lambda q, k, v: flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=case["causal"]),
                     qkv, mode)
    return _step(lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=case["causal"]), _dense(case, "bshd"), mode)


def providers(device: str, names: list[str] | None = None) -> dict:
    if device == "cuda":
        table = {"mmfast-triton": _mmfast(lambda dev: "triton"), "mmfast-auto": _mmfast(lambda dev: None),
                 "sdpa-cudnn": _sdpa("cudnn"), "sdpa-flash": _sdpa("flash"), "sdpa-efficient": _sdpa("efficient"),
                 "sdpa": _sdpa(None), "sdpa-math": _sdpa("math"), "flash-attn": _flash_attn}
    else:
        table = {"mmfast-reference": _mmfast(lambda dev: "reference"), "mmfast-cpp": _mmfast(lambda dev: "cpp"),
                 "mmfast-auto": _mmfast(lambda dev: None),
                 "sdpa": _sdpa(None), "sdpa-flash": _sdpa("flash"), "sdpa-math": _sdpa("math")}
    table["flex"] = _flex  # compiles per shape: last under --budget-s
    return harness.select_providers(table, names)


def warm_up(table: dict, cases: list[dict], modes: list[str], deadline: float) -> float:
    """Run each provider once on a small copy of each distinct (head dim, mask kind) case, so that Triton's
    and FlexAttention's compiles happen before the timed sweep (Triton's kernels and flex's dynamic compile
    do not depend on the sequence length). Errors are left to the sweep. Returns the seconds spent."""
    import time

    t0 = time.monotonic()
    for setup in table.values():
        seen = set()
        for c in cases:
            key = (c["D"], c["causal"], c.get("prefix"), bool(c.get("varlen")), bool(c.get("decode")),
                   bool(c.get("page")))
            if key in seen or time.monotonic() > deadline:
                continue
            seen.add(key)
            small = {**c, "B": min(c["B"], 2)}
            if not c.get("decode") and not c.get("varlen"):
                small["S"] = max(min(c["S"], 256), (c.get("prefix") or 0) + 64)
            for mode in modes:
                try:
                    step = setup(small, mode)
                    step()
                    if small["device"] == "cuda":
                        torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - the sweep records the error as the row's
                    print(f"warm-up: {c['name']} {mode}: {type(e).__name__}: {str(e)[:80]}")
    return time.monotonic() - t0


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfast bench attention", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, "attention")
    p.add_argument("--quick", action="store_true", help="only the first cases (GPU: ViT-B and LLaVA 2k)")
    p.add_argument("--cases", help="comma-separated case names (see the module docstring)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not compile each provider on a small case first (then compiles count in the budget)")
    return p


def main(argv: list[str] | None = None) -> int:
    return harness.sweep_cli(_parser(), argv, _sweep)


def _sweep(args: argparse.Namespace, device: str, modes: list[str]) -> int:
    """The attention sweep after parsing (:func:`mmfast.bench.harness.sweep_cli`)."""
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
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    names = harness.provider_names(args)
    if names is None and not gpu and args.quick:
        names = ["mmfast-reference", "sdpa"]  # flex compiles for minutes on CPU
    table = providers(device, names)
    out = harness.results_csv(args, "attention", device)
    # The harness plots against one integer axis: the case's index in this sweep (names in `params`).
    gemm = gemm_tflops(device)
    if gemm is not None:
        print(f"bf16 GEMM (8192^3): {gemm:.1f} TFLOP/s")
    extra = {"gemm_tflops": round(gemm, 1)} if gemm is not None else {}
    cases = [{**c, "case": i, "dtype": dtype, "device": device, **extra} for i, c in enumerate(base)]
    budget = args.budget_s
    if gpu and not args.no_warmup:
        import time

        # the warm-up takes at most half the budget; what it spends comes off the sweep's budget
        spent = warm_up(table, cases, modes, time.monotonic() + (budget / 2 if budget else 600))
        print(f"warm-up (compiles): {spent:.1f}s")
        budget = None if budget is None else max(1.0, budget - spent)
    rows = harness.run(
        "attention", table, cases, x_key="case", device=device, modes=modes, flops=flops,
        budget_s=budget, out_csv=out, plot=not args.no_plot,
        **({"reps": 2, "max_s": 3.0} if not gpu else {}),
    )
    return 0 if any(not r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

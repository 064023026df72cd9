"""Fused CLIP / SigLIP losses: every backend against an fp64 reference, with PyTorch's own result in
the same dtype as the yardstick (mmfast.testing.assert_error_bound), on odd and round shapes.

Triton kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py); with MMFAST_TEST_CUDA=1 on
a GPU machine the `triton_backend` fixture switches them to the compiled kernels.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from contrastive_helpers import check_against_reference, features, loss_and_grads

import mmfast.ops._contrastive_gemm as cgemm
import mmfast.ops._contrastive_triton as ctri
from mmfast.ops import BackendUnavailableError
from mmfast.ops import contrastive as C


def _cpp_importable() -> bool:
    try:
        importlib.import_module("mmfast.ops._contrastive_cpp")
    except Exception:  # noqa: BLE001  (not built, or mid-build: either way no cpp backend to test)
        return False
    return True


BACKENDS = ["triton_interpret", "gemm_interpret", "reference"] + (["cpp"] if _cpp_importable() else [])
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 8), (37, 19), (64, 32)]


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every buffer a Triton kernel should fill starts as NaN: an unwritten element fails the bound."""
    monkeypatch.setattr(ctri, "POISON_OUTPUTS", True)
    monkeypatch.setattr(cgemm, "POISON_OUTPUTS", True)


def _backend(name: str, triton_backend: str) -> str:
    if name == "cpp" and triton_backend == "triton":
        pytest.skip("the cpp backend runs on CPU tensors; this run tests CUDA")
    if name == "gemm_interpret" and triton_backend == "triton":
        return "gemm"
    return triton_backend if name == "triton_interpret" else name


# --------------------------------------------------------------------------- symmetric losses
CASES = {
    # name: (loss, label_smoothing, scale, bias, unit-norm-ish features)
    "clip": ("clip", 0.0, 10.0, None, True),
    "clip_smooth_bias_s100": ("clip", 0.1, math.exp(4.6), -2.0, True),
    "clip_unnormalised_s100": ("clip", 0.1, math.exp(4.6), None, False),
    "siglip": ("siglip", 0.0, 10.0, -10.0, True),
    "siglip_unnormalised_s100": ("siglip", 0.0, math.exp(4.6), 3.0, False),
}


def _loss_fns(case, backend):
    kind, ls, _, _, _ = CASES[case]
    if kind == "clip":
        return (
            lambda a, b, s, bias: C.clip_loss(a, b, s, bias, label_smoothing=ls, backend=backend),
            lambda a, b, s, bias: C.clip_loss_reference(a, b, s, bias, label_smoothing=ls),
        )
    return (
        lambda a, b, s, bias: C.siglip_loss(a, b, s, bias, backend=backend),
        C.siglip_loss_reference,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}d{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_grads_match_fp64(backend, case, dtype, shape, device, triton_backend):
    n, d = shape
    _, _, scale, bias, unit = CASES[case]
    a, b = features(n, n, d, dtype, seed=n * 1000 + d, unit=unit, device=device)
    s = torch.tensor(scale, device=device)
    beta = None if bias is None else torch.tensor(bias, device=device)
    fn, ref_fn = _loss_fns(case, _backend(backend, triton_backend))
    check_against_reference(fn, ref_fn, a, b, s, beta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["clip_smooth_bias_s100", "siglip"])
def test_large_d_not_power_of_two(case, dtype, device, triton_backend):
    """N=300, d=1152: several row/column blocks with ragged edges, d walked in many masked chunks."""
    _, _, scale, bias, unit = CASES[case]
    a, b = features(300, 300, 1152, dtype, seed=7, unit=unit, device=device)
    s = torch.tensor(scale, device=device)
    beta = None if bias is None else torch.tensor(bias, device=device)
    fn, ref_fn = _loss_fns(case, triton_backend)
    check_against_reference(fn, ref_fn, a, b, s, beta)


@pytest.mark.parametrize("case", ["clip_smooth_bias_s100", "siglip"])
def test_mixed_dtypes_under_autocast(case, device, triton_backend):
    """Under autocast, bf16 image and fp32 text features (a fused head beside F.normalize, which CUDA
    autocast runs in fp32) are both cast to bf16, as an unfused ``image @ text.T`` would be; without
    autocast the mismatch is an error naming both dtypes."""
    _, _, scale, bias, unit = CASES[case]
    a, b = features(37, 37, 19, torch.float32, seed=11, unit=unit, device=device)
    s = torch.tensor(scale, device=device)
    beta = None if bias is None else torch.tensor(bias, device=device)
    fn, _ = _loss_fns(case, triton_backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = loss_and_grads(fn, a.bfloat16(), b, s, beta)
    same = loss_and_grads(fn, a.bfloat16(), b.bfloat16(), s, beta)
    assert mixed["d_image"].dtype == torch.bfloat16 and mixed["d_text"].dtype == torch.float32
    for name in same:
        torch.testing.assert_close(mixed[name].float(), same[name].float(), rtol=0, atol=0)
    with pytest.raises(TypeError, match="image_features dtype torch.bfloat16 != text_features dtype torch.float32"):
        fn(a.bfloat16(), b, s, beta)


@pytest.mark.parametrize("case", ["clip_smooth_bias_s100", "siglip"])
def test_fp16_and_non_contiguous(case, device, triton_backend):
    """fp16 operands, and features that are strided views (the kernels take explicit strides)."""
    _, _, scale, bias, unit = CASES[case]
    a, b = features(37, 37, 38, torch.float16, seed=3, unit=unit, device=device)
    a, b = a[:, ::2], b.t().contiguous().t()[:, 1::2]  # (37, 19) views: column stride 2
    assert not a.is_contiguous() and not b.is_contiguous()
    s = torch.tensor(scale, device=device)
    beta = None if bias is None else torch.tensor(bias, device=device)
    fn, ref_fn = _loss_fns(case, triton_backend)
    check_against_reference(fn, ref_fn, a, b, s, beta)


# --------------------------------------------------------------------------- rectangular pieces
RECT = [(13, 40, 0), (13, 40, 20), (13, 40, 27), (37, 37, 0), (1, 5, 4)]


@pytest.mark.parametrize("m,k,offset", RECT, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_rows_sum_with_offset(backend, dtype, m, k, offset, device, triton_backend):
    a, b = features(m, k, 19, dtype, seed=m + k + offset, offset=offset, device=device)
    s, beta = torch.tensor(30.0, device=device), torch.tensor(0.5, device=device)
    be = _backend(backend, triton_backend)
    check_against_reference(
        lambda a, b, s, bias: C.clip_rows_sum(a, b, s, bias, label_smoothing=0.1, offset=offset, backend=be),
        lambda a, b, s, bias: C.clip_rows_reference(a, b, s, bias, 0.1, offset),
        a, b, s, beta,
    )


@pytest.mark.parametrize("m,k,offset", RECT, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_sum_with_offset(backend, dtype, m, k, offset, device, triton_backend):
    a, b = features(m, k, 19, dtype, seed=m * k + offset, offset=offset, device=device)
    s, beta = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    be = _backend(backend, triton_backend)
    check_against_reference(
        lambda a, b, s, bias: C.siglip_sum(a, b, s, bias, offset=offset, backend=be),
        lambda a, b, s, bias: C.siglip_sum_reference(a, b, s, bias, offset),
        a, b, s, beta,
    )


def test_clip_rows_sum_without_bias_has_no_bias_grad(device, triton_backend):
    a, b = features(5, 9, 16, torch.float32, seed=1, offset=2, device=device)
    a.requires_grad_()
    s = torch.tensor(10.0, device=device, requires_grad=True)
    loss = C.clip_rows_sum(a, b, s, None, offset=2, backend=triton_backend)
    ga, gs = torch.autograd.grad(loss, (a, s))
    assert torch.isfinite(ga).all() and torch.isfinite(gs).all() and ga.abs().sum() > 0


@pytest.mark.parametrize(
    "kind, m, k, offset",
    [("clip", 37, 37, 0), ("clip_rows", 13, 40, 20), ("siglip", 37, 37, 0), ("siglip_rows", 13, 40, 27)],
)
def test_split_backward_matches_fp64(kind, m, k, offset, monkeypatch, device, triton_backend):
    """The deterministic two-launch backward (db from the transposed problem) meets the same bound."""
    monkeypatch.setenv("MMFAST_CONTRASTIVE_BWD", "split")
    assert ctri._bwd_mode() == "split"
    a, b = features(m, k, 19, torch.float32, seed=m + k, offset=offset, device=device)
    s, beta = torch.tensor(30.0, device=device), torch.tensor(-3.0, device=device)
    if kind == "clip":
        fn = lambda a, b, s, bias: C.clip_loss(a, b, s, bias, label_smoothing=0.1, backend=triton_backend)
        ref = lambda a, b, s, bias: C.clip_loss_reference(a, b, s, bias, label_smoothing=0.1)
    elif kind == "clip_rows":
        fn = lambda a, b, s, bias: C.clip_rows_sum(
            a, b, s, bias, label_smoothing=0.1, offset=offset, backend=triton_backend
        )
        ref = lambda a, b, s, bias: C.clip_rows_reference(a, b, s, bias, 0.1, offset)
    elif kind == "siglip":
        fn = lambda a, b, s, bias: C.siglip_loss(a, b, s, bias, backend=triton_backend)
        ref = C.siglip_loss_reference
    else:
        fn = lambda a, b, s, bias: C.siglip_sum(a, b, s, bias, offset=offset, backend=triton_backend)
        ref = lambda a, b, s, bias: C.siglip_sum_reference(a, b, s, bias, offset)
    check_against_reference(fn, ref, a, b, s, beta)


def test_backward_mode_selection(monkeypatch):
    monkeypatch.delenv("MMFAST_CONTRASTIVE_BWD", raising=False)
    assert ctri._bwd_mode() == "fused"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert ctri._bwd_mode() == "split"  # fp32 atomics are not deterministic
    monkeypatch.setenv("MMFAST_CONTRASTIVE_BWD", "fused")
    assert ctri._bwd_mode() == "fused"
    monkeypatch.setenv("MMFAST_CONTRASTIVE_BWD", "fast")
    with pytest.raises(ValueError, match="MMFAST_CONTRASTIVE_BWD='fast'"):
        ctri._bwd_mode()


# --------------------------------------------------------------------------- the gemm backend's chunks
def _gemm_backend(triton_backend):
    return "gemm" if triton_backend == "triton" else "gemm_interpret"


def _fns(kind, offset, backend):
    """(fn under test, its fp64 reference) for the four problem forms."""
    if kind == "clip":
        return (lambda a, b, s, bias: C.clip_loss(a, b, s, bias, label_smoothing=0.1, backend=backend),
                lambda a, b, s, bias: C.clip_loss_reference(a, b, s, bias, label_smoothing=0.1))
    if kind == "clip_rows":
        return (lambda a, b, s, bias: C.clip_rows_sum(a, b, s, bias, label_smoothing=0.1, offset=offset,
                                                      backend=backend),
                lambda a, b, s, bias: C.clip_rows_reference(a, b, s, bias, 0.1, offset))
    if kind == "siglip":
        return (lambda a, b, s, bias: C.siglip_loss(a, b, s, bias, backend=backend), C.siglip_loss_reference)
    return (lambda a, b, s, bias: C.siglip_sum(a, b, s, bias, offset=offset, backend=backend),
            lambda a, b, s, bias: C.siglip_sum_reference(a, b, s, bias, offset))


def _budget_for(rows, k, dtype):
    """The MMFAST_CONTRASTIVE_CHUNK_MB that gives chunks of ``rows`` rows."""
    return str((rows + 0.5) * cgemm.row_bytes(k, dtype) / 2**20)


@pytest.mark.parametrize("rows", [1, 3, 10_000], ids=["C1", "C3", "one_chunk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kind, m, k, offset",
    [("clip", 37, 37, 0), ("clip_rows", 13, 40, 20), ("siglip", 37, 37, 0), ("siglip_rows", 13, 40, 27)],
)
def test_gemm_chunks_match_fp64(kind, m, k, offset, dtype, rows, monkeypatch, device, triton_backend):
    """A tiny chunk budget: one row per chunk, ragged chunks of 3 (37 = 12·3 + 1, 13 = 4·3 + 1), one chunk;
    loss and every gradient within the bound, with label smoothing, bias, offset, both losses."""
    monkeypatch.setenv("MMFAST_CONTRASTIVE_CHUNK_MB", _budget_for(rows, k, dtype))
    assert cgemm.chunk_rows(m, k, dtype) == min(rows, m)
    a, b = features(m, k, 19, dtype, seed=m + k + rows, offset=offset, device=device)
    s, beta = torch.tensor(30.0, device=device), torch.tensor(-3.0, device=device)
    fn, ref = _fns(kind, offset, _gemm_backend(triton_backend))
    check_against_reference(fn, ref, a, b, s, beta)


def test_gemm_chunk_budget_errors_name_the_variable(monkeypatch):
    for bad in ("0", "-3", "lots", "nan"):
        monkeypatch.setenv("MMFAST_CONTRASTIVE_CHUNK_MB", bad)
        with pytest.raises(ValueError, match="MMFAST_CONTRASTIVE_CHUNK_MB"):
            cgemm.chunk_rows(100, 100, torch.float32)
    monkeypatch.delenv("MMFAST_CONTRASTIVE_CHUNK_MB")
    # the default budget at N = 32k, bf16: about 1.3k rows, a multiple of 64, inside 256 MiB
    c = cgemm.chunk_rows(32768, 32768, torch.bfloat16)
    assert c % 64 == 0 and 1024 <= c and c * cgemm.row_bytes(32768, torch.bfloat16) <= 256 * 2**20


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gemm_extra_memory_stays_within_the_chunk_budget(kind, monkeypatch, device, triton_backend):
    """LiveBytes counts every tensor the call allocates and keeps alive at once: at most the chunk budget
    plus O((N + K)·d) (the gradients, the fp32 db accumulator, O(N) vectors), far below the N² logits."""
    from mmfast.testing import LiveBytes

    if device != "cpu":
        pytest.skip("LiveBytes on CPU tensors")
    n, d = 1024, 8
    budget = 128 * cgemm.row_bytes(n, torch.float32)  # 8 chunks
    monkeypatch.setenv("MMFAST_CONTRASTIVE_CHUNK_MB", str(budget / 2**20))
    assert cgemm.chunk_rows(n, n, torch.float32) == 128
    a, b = features(n, n, d, torch.float32, seed=9, device=device)
    a.requires_grad_()
    b.requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    with LiveBytes() as lb:
        if kind == "clip":
            loss = C.clip_loss(a, b, s, label_smoothing=0.1, backend=_gemm_backend(triton_backend))
        else:
            loss = C.siglip_loss(a, b, s, -10.0, backend=_gemm_backend(triton_backend))
        loss.backward()
    linear = 4 * (2 * n * d * 4) + 64 * n * 8  # da, db, db's fp32 accumulator, a spare; O(N) vectors
    assert lb.peak <= budget + linear, (lb.peak, budget, linear)
    assert lb.peak < n * n * 4 / 2  # half of one fp32 (N, N) logits


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gemm_backend_is_bitwise_deterministic(kind, monkeypatch, device, triton_backend):
    """No atomics: two runs give the same bits (several chunks, so db accumulates across them)."""
    monkeypatch.setenv("MMFAST_CONTRASTIVE_CHUNK_MB", _budget_for(5, 37, torch.bfloat16))
    a, b = features(37, 37, 24, torch.bfloat16, seed=3, device=device)
    s, beta = torch.tensor(20.0, device=device), torch.tensor(-2.0, device=device)
    fn, _ = _fns(kind, 0, _gemm_backend(triton_backend))
    first, second = loss_and_grads(fn, a, b, s, beta), loss_and_grads(fn, a, b, s, beta)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_gemm_returns_the_fused_kernels_lse(device, triton_backend):
    """clip_fwd's row/column log-sum-exp equal the fp64 ones, across chunks."""
    k = C._kernels(_gemm_backend(triton_backend))
    a, b = features(37, 37, 19, torch.float32, seed=11, device=device)
    s, beta = torch.tensor(20.0, device=device), torch.tensor(-1.0, device=device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFAST_CONTRASTIVE_CHUNK_MB", _budget_for(4, 37, torch.float32))
        _, lse_row, lse_col = k.clip_fwd(a, b, s, beta, 0.0, 0, True)
    z = 20.0 * a.double() @ b.double().t() - 1.0
    torch.testing.assert_close(lse_row.double(), z.logsumexp(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(lse_col.double(), z.logsumexp(0), rtol=0, atol=1e-5)


def test_auto_takes_gemm_first_on_cuda_and_says_why():
    """On an sm90 card (faked) auto takes the gemm backend for CLIP and SigLIP; `explain` shows the order."""
    from mmfast.ops._dispatch import Facts, fake_env

    sm90 = {"cuda_available": True, "arch": "sm90", "interpret": False, "triton_error": None}
    with fake_env(**sm90):
        for op in (C.CLIP_OP, C.SIGLIP_OP):
            facts = Facts("cuda", torch.bfloat16, {"n": 32768, "d": 768})
            assert op.select(facts) == "gemm"
            text = "\n".join(op.explain(facts))
            assert "* gemm" in text and "triton" in text, text


def test_gemm_refuses_a_torch_without_fp32_output_gemms(monkeypatch):
    """The CUDA path needs mm/baddbmm with out_dtype=float32; without them auto passes it over, naming why,
    and forcing it raises with that reason."""
    from mmfast.ops._dispatch import Facts, fake_env

    monkeypatch.setattr(cgemm, "missing_gemm_ops", lambda: ["torch 2.0 lacks aten::mm.dtype_out"])
    with fake_env(cuda_available=True, arch="sm90", interpret=False, triton_error=None):
        facts = Facts("cuda", torch.bfloat16, {"k": 8192})
        assert C.CLIP_OP.select(facts) == "triton"
        assert "lacks aten::mm.dtype_out" in "\n".join(C.CLIP_OP.explain(facts))
        with pytest.raises(BackendUnavailableError, match="'gemm' cannot run siglip_loss.*lacks aten::mm.dtype_out"):
            C.SIGLIP_OP.select(facts, "gemm")


def test_info_explains_the_contrastive_choice(capsys):
    from mmfast.cli import main
    from mmfast.ops._dispatch import fake_env

    with fake_env(interpret=False, triton_error=None):  # as on the card: compiled Triton, no interpreter
        assert main(["info", "--explain", "clip_loss", "--family", "sm90", "--n", "32768"]) == 0
    out = capsys.readouterr().out
    assert "shape class k32k" in out and "* gemm" in out and "triton            could run" in out, out
    assert main(["info", "--explain", "siglip_loss", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "siglip_loss: device cpu" in out and "gemm              refused: needs CUDA tensors" in out, out


# --------------------------------------------------------------------------- kernel internals
def test_kernel_returns_lse_stats(device, triton_backend):
    """clip_fwd's row/column log-sum-exp equal the fp64 ones (the distributed loss relies on them)."""
    k = C._kernels(triton_backend)
    a, b = features(37, 37, 19, torch.float32, seed=11, device=device)
    s, beta = torch.tensor(20.0, device=device), torch.tensor(-1.0, device=device)
    _, lse_row, lse_col = k.clip_fwd(a, b, s, beta, 0.0, 0, True)
    z = 20.0 * a.double() @ b.double().t() - 1.0
    torch.testing.assert_close(lse_row.double(), z.logsumexp(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(lse_col.double(), z.logsumexp(0), rtol=0, atol=1e-5)
    _, _, none_col = k.clip_fwd(a, b, s, beta, 0.0, 0, False)
    assert none_col is None


def test_poison_hook_fills_kernel_outputs_with_nan():
    """The autouse fixture is live: kernel buffers start as NaN, so an unwritten element would fail."""
    assert torch.isnan(ctri._out((5,), "cpu")).all()
    assert torch.isnan(ctri._out((2, 3), "cpu", dtype=torch.float64)).all()
    assert (ctri._out((4,), "cpu", zero=True) == 0).all()  # the db atomics' target must start at 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_no_buffer_scales_with_n_squared(kind, monkeypatch, device, triton_backend):
    """Every buffer the kernels get is O(N·d) or O(N²/BM): never the (N, N) logits."""
    sizes = []
    real_out = ctri._out

    def recording_out(shape, *args, **kw):
        sizes.append(math.prod(shape))
        return real_out(shape, *args, **kw)

    monkeypatch.setattr(ctri, "_out", recording_out)
    n, d = 256, 16
    a, b = features(n, n, d, torch.float32, seed=4, device=device)
    a.requires_grad_()
    s = torch.tensor(10.0, device=device)
    if kind == "clip":
        loss = C.clip_loss(a, b, s, label_smoothing=0.1, backend=triton_backend)
    else:
        loss = C.siglip_loss(a, b, s, -10.0, backend=triton_backend)
    loss.backward()
    assert sizes and max(sizes) <= max(n * d, 3 * n * n // 16), sizes


def test_extra_memory_formula():
    mem = ctri.extra_memory_bytes(4096, 4096, 768, True, 0.1, torch.bfloat16)
    rows = 4096 // (64 if ctri._INTERPRET else 128)
    assert mem["fwd"] == 3 * rows * 4096 * 4
    assert ctri.extra_memory_bytes(4096, 4096, 768, False, 0.0, torch.bfloat16)["fwd"] == 0


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["triton_interpret", "gemm_interpret", "reference"])
def test_torch_compile_traces_the_loss(kind, backend, device, triton_backend):
    """aot_eager runs Dynamo + AOTAutograd over the custom ops (fake tensors, registered backward)
    without Inductor, so it works on CPU; fullgraph=True proves there is no graph break."""
    torch._dynamo.reset()
    be = _backend(backend, triton_backend)
    a, b = features(37, 37, 19, torch.float32, seed=5, device=device)
    s, beta = torch.tensor(10.0, device=device), torch.tensor(-2.0, device=device)
    if kind == "clip":
        def fn(a, b, s, bias):
            return C.clip_loss(a, b, s, bias, label_smoothing=0.1, backend=be)
    else:
        def fn(a, b, s, bias):
            return C.siglip_loss(a, b, s, bias, backend=be)
    eager = loss_and_grads(fn, a, b, s, beta)
    compiled = loss_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), a, b, s, beta)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=0, msg=name)


def test_custom_ops_pass_opcheck(device, triton_backend):
    """Schema, fake-tensor, autograd-registration and AOT-dispatch checks of the registered ops."""
    from mmfast.ops import _contrastive_library  # noqa: F401  (registers the ops)

    a, b = features(9, 9, 16, torch.float32, seed=2, device=device)
    a.requires_grad_()
    b.requires_grad_()
    s = torch.tensor(10.0, device=device, requires_grad=True)
    beta = torch.tensor(-1.0, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mmfast.clip_loss_fwd.default, (a, b, s, beta, 0.1, 0, True, triton_backend))
    torch.library.opcheck(torch.ops.mmfast.clip_loss_fwd.default, (a, b, s, None, 0.0, 0, False, triton_backend))
    torch.library.opcheck(torch.ops.mmfast.siglip_loss_fwd.default, (a, b, s, beta, 0, triton_backend))


# --------------------------------------------------------------------------- errors
def _pair(n=4, d=8, **kw):
    return torch.randn(n, d, **kw), torch.randn(n, d, **kw)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(4, 8), torch.randn(5, 8)), ValueError, "equal batch sizes"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 9)), ValueError, "dim"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.bfloat16)), TypeError, "dtype"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError, "on cpu"),
        (lambda: (torch.randn(8), torch.randn(8)), ValueError, "2-D"),
        (lambda: (torch.randn(0, 8), torch.randn(0, 8)), ValueError, "empty"),
        (lambda: (torch.randint(0, 3, (4, 8)), torch.randint(0, 3, (4, 8))), TypeError, "dtype"),
        (lambda: ([[1.0]], [[1.0]]), TypeError, "torch.Tensor"),
    ],
    ids=["rows", "dim", "dtype", "device", "1d", "empty", "int", "list"],
)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_bad_features_raise_naming_the_argument(loss, make, exc, match):
    a, b = make()
    fn = C.clip_loss if loss == "clip" else C.siglip_loss
    with pytest.raises(exc, match=match):
        fn(a, b, 10.0, -10.0)


def test_bad_scalars_and_options_raise():
    a, b = _pair()
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        C.clip_loss(a, b, torch.ones(2))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        C.siglip_loss(a, b, 10.0, torch.ones(1, 2))
    with pytest.raises(ValueError, match="logit_bias is required"):
        C.siglip_loss(a, b, 10.0, None)
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        C.clip_loss(a, b, torch.tensor(1.0, device="meta"))
    with pytest.raises(ValueError, match="label_smoothing"):
        C.clip_loss(a, b, 10.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="offset 3 with 4 rows does not fit 6 columns"):
        C.clip_rows_sum(a, torch.randn(6, 8), 10.0, offset=3)
    with pytest.raises(ValueError, match="offset -1"):
        C.siglip_sum(a, b, 10.0, 0.0, offset=-1)


def test_unknown_backend_name_raises():
    a, b = _pair()
    with pytest.raises(ValueError, match="backend='cuda_magic'"):
        C.clip_loss(a, b, 10.0, backend="cuda_magic")


def test_forced_backend_that_cannot_run_names_the_reason(monkeypatch):
    a, b = _pair()
    with pytest.raises(BackendUnavailableError, match="'triton' cannot run clip_loss.*needs CUDA tensors"):
        C.clip_loss(a, b, 10.0, backend="triton")
    with pytest.raises(BackendUnavailableError, match="'triton' cannot run siglip_loss.*needs CUDA tensors"):
        C.siglip_sum(a, b, 10.0, -10.0, backend="triton")
    monkeypatch.setenv("MMFAST_BACKEND", "triton")  # forcing through the environment is refused alike
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        C.clip_rows_sum(a, b, 10.0)


def test_info_lists_clip_loss_and_the_interpret_backend(capsys):
    from mmfast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "clip_loss [cpu" in out and "siglip_loss [cpu" in out
    if ctri._INTERPRET:
        assert "TRITON_INTERPRET at import: 1" in out
        section = out.split("clip_loss [cpu", 1)[1].split("\n\n", 1)[0]
        assert "* triton_interpret  chosen" in section


_SM90_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
import mmfast.ops._contrastive_triton as T
from mmfast.testing import sm90_usage

for kernel, in_t, phase, consts in [
    (T._fwd_kernel, in_t, "fwd", dict(SIGLIP=siglip, SYMMETRIC=not siglip, SMOOTH=not siglip))
    for in_t in ("*bf16", "*fp32") for siglip in (False, True)
] + [
    # the fused backward (db by atomics), and the split backward's transposed launch (SWAP)
    (T._bwd_kernel, in_t, "bwd", dict(SIGLIP=siglip, ROW_CE=not siglip, COL_CE=not siglip, DB=not swap, SWAP=swap))
    for in_t in ("*bf16", "*fp32") for siglip in (False, True) for swap in (False, True)
]:
    dtype = torch.bfloat16 if in_t == "*bf16" else torch.float32
    cfg = T._cfg(torch.empty(0, dtype=dtype), 4096, 4096, 768, phase)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    et = "*fp64" if dtype == torch.float32 else "*fp32"
    consts.update(cfg, HAS_BIAS=True, UPCAST=False, PRECISION="ieee", EXACT=dtype == torch.float32)
    ptrs = dict(a_ptr=in_t, b_ptr=in_t, lse_row_ptr="*fp64", lse_col_ptr="*fp64", zpos_ptr="*fp64",
                pm_ptr=et, pl_ptr=et, pc_ptr=et)
    _, stack = sm90_usage(kernel, lambda n: ptrs.get(n, "*fp32"), consts, warps, stages, floats=("smooth",))
    assert stack == 0, f"{kernel.fn.__name__} {in_t} {consts} spills {stack} bytes"
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """No GPU needed: Triton compiles the H100 configs to a cubin; none may spill registers."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE], check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


_SM90_GEMM_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
import mmfast.ops._contrastive_gemm as G
from mmfast.testing import sm90_usage

cases = [(G._fwd_tiles, in_t, dict(SIGLIP=sig, SYMMETRIC=not sig, SMOOTH=not sig))
         for in_t in ("*bf16", "*fp32") for sig in (False, True)]
cases += [(G._bwd_tiles, in_t, dict(SIGLIP=sig, ROW_CE=not sig, COL_CE=not sig, RTNE_BITS=False))
          for in_t in ("*bf16", "*fp32") for sig in (False, True)]
cases += [(G._fold_rows, in_t, dict(SMOOTH=True, BR=32, BJ=32)) for in_t in ("*bf16", "*fp32")]
cases += [(G._merge_cols, in_t, dict(SMOOTH=True, BC=256)) for in_t in ("*bf16", "*fp32")]
fp64 = ("lse_row_ptr", "lse_col_ptr", "lse_ptr", "loss_ptr", "cm_ptr", "cl_ptr", "cz_ptr")
fp32 = ("s_ptr", "scale_ptr", "bias_ptr", "grad_ptr")
for kernel, in_t, consts in cases:
    exact = in_t == "*fp32"
    BM, BN, warps = G._blocks(torch.float32 if exact else torch.bfloat16)
    if "SIGLIP" in consts:
        consts = dict(consts, HAS_BIAS=True, EXACT=exact, BM=BM, BN=BN)
    else:
        warps = 4
    et = "*fp64" if exact else "*fp32"
    ptrs = lambda n: in_t if n == "g_ptr" else "*fp64" if n in fp64 else "*fp32" if n in fp32 else et
    regs, stack = sm90_usage(kernel, ptrs, consts, warps, floats=("smooth",))
    print(f"{kernel.fn.__name__:<11} {in_t:<6} {consts.get('SIGLIP') and 'siglip' or 'clip':<7} regs {regs:3d} stack {stack}")
    assert stack == 0, f"{kernel.fn.__name__} {in_t} {consts} spills {stack} bytes"
"""


@pytest.mark.slow
def test_gemm_stage_kernels_compile_for_sm90_without_spills():
    """No GPU needed: the gemm backend's softmax-stage kernels, at their block sizes, compile to sm_90 cubins
    that keep everything in registers (the script prints the register counts)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _SM90_GEMM_COMPILE], check=False, capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("stack 0") == 12, r.stdout


# --------------------------------------------------------------------------- GPU (MMFAST_TEST_CUDA=1)
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fused", "gemm", "gemm_chunked"])
@pytest.mark.parametrize("case", ["clip_smooth_bias_s100", "siglip"])
def test_cuda_bf16_large_batch(case, kernels, device, triton_backend, monkeypatch):
    """The compiled kernels at a training-size batch: N=4096, d=768, bf16, against fp64 on the GPU; the gemm
    backend in one chunk and in chunks of 576 rows (a ragged last one: cuBLAS's fp32-output GEMMs, db accumulated)."""
    if device != "cuda":
        pytest.skip("runs in the GPU suite (MMFAST_TEST_CUDA=1)")
    if kernels == "gemm_chunked":
        monkeypatch.setenv("MMFAST_CONTRASTIVE_CHUNK_MB", _budget_for(600, 4096, torch.bfloat16))
    _, _, scale, bias, unit = CASES[case]
    a, b = features(4096, 4096, 768, torch.bfloat16, seed=0, unit=unit, device=device)
    s = torch.tensor(scale, device=device)
    beta = None if bias is None else torch.tensor(bias, device=device)
    fn, ref_fn = _loss_fns(case, triton_backend if kernels == "fused" else "gemm")
    check_against_reference(fn, ref_fn, a, b, s, beta)

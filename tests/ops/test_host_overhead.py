"""Host side of the ops (issue #23): ``mmfast bench host`` runs and counts what it should; torch.compile
traces each op's forward + backward with no more graph breaks than the native op of the same kind;
(GPU) each op's forward + backward is captured by a CUDA graph and replays to eager's results.
Speed targets live in the benchmark (docs/host_overhead.md), not here."""
import os

import pytest
import torch

from mmfast.bench import host

OPS = list(host.cases())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the host bench runs the interpreter backend")
def test_bench_host_measures_every_op_with_stubbed_launches(capsys):
    rows = host.measure(["layer_norm", "swiglu", "rotary_embedding"], reps=4, block=2)
    assert [r["op"] for r in rows] == ["layer_norm", "swiglu", "rotary_embedding"]
    for r in rows:
        assert r["ours_us"] > 0 and r["native_us"] > 0 and r["ratio"] > 0
    launches = {r["op"]: r["launches"] for r in rows}
    # forward + backward: one launch each (the kernels are stubbed, the launches still counted)
    assert launches == {"layer_norm": 2, "swiglu": 2, "rotary_embedding": 2}
    assert "ratio" in capsys.readouterr().out


def test_bench_host_cli_rejects_unknown_ops(capsys):
    from mmfast.cli import main

    assert main(["bench", "host", "--ops", "no_such_op", "--reps", "1", "--out", "none"]) == 2
    assert "unknown ops ['no_such_op']" in capsys.readouterr().err


def _explain(fn, inputs):
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*inputs)


@pytest.mark.parametrize("op", OPS)
def test_compile_graph_breaks_match_native(op, triton_backend, device):
    ours, native, make, _ = host.cases(triton_backend, device)[op]
    inputs = make()
    e_ours, e_native = _explain(ours, inputs), _explain(native, inputs)
    assert e_ours.graph_break_count == e_native.graph_break_count, (
        f"{op}: {e_ours.graph_break_count} graph breaks ({e_ours.break_reasons}), "
        f"the native op {e_native.graph_break_count}")
    assert e_ours.graph_count == e_native.graph_count == 1
    # the kernel path is one or more mmfast:: custom ops (inside the autograd Function's subgraphs)
    assert "mmfast" in "".join(g.print_readable(print_output=False) for g in e_ours.graphs), op


@pytest.mark.parametrize("op", ["rotary_embedding", "swiglu", "swiglu_down", "add_rms_norm"])
def test_compiled_fwd_bwd_equals_eager(op, triton_backend, device):
    """The LLaMA fused set under torch.compile (fullgraph, aot_eager): the custom ops are opaque nodes with
    fakes, and forward + backward give eager's results bit for bit."""
    ours, _, make, _ = host.cases(triton_backend, device)[op]
    inputs = make()
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(fn):
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, diff))

    torch._dynamo.reset()
    eager = run(ours)
    compiled = run(torch.compile(ours, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_CAPTURE_XFAIL = {
    "fused_linear_cross_entropy": "the target range check reads the device (bool(bad.any()), a sync) on every "
                                  "call: not capturable until it is skipped while a stream captures (projection.py)",
}


@pytest.mark.gpu
@pytest.mark.parametrize("op", [pytest.param(o, marks=pytest.mark.xfail(strict=True, reason=_CAPTURE_XFAIL[o]))
                                if o in _CAPTURE_XFAIL else o for o in OPS])
def test_cuda_graph_capture_fwd_bwd(op, device, triton_backend):
    """Forward + backward of each op captured in one CUDA graph; a replay on new input values gives what
    eager gives on them (no host reads, no allocations outside the graph's pool, no CPU syncs)."""
    if device != "cuda":
        pytest.skip("runs in the GPU suite (MMFAST_TEST_CUDA=1)")
    ours, _, make, _ = host.cases(triton_backend, device)[op]
    inputs = make()
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        out = ours(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        outs = [o for o in outs if o.requires_grad]
        return outs, torch.autograd.grad(outs, diff, [torch.ones_like(o) for o in outs])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_outs, g_grads = step()
    with torch.no_grad():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    e_outs, e_grads = step()
    for a, b in zip(list(g_outs) + list(g_grads), list(e_outs) + list(e_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_constant_result_marks_as_dynamo_does_and_importing_mmfast_loads_no_dynamo():
    """``constant_result`` sets what ``torch._dynamo.assume_constant_result`` sets (so a torch release that
    changes the mark fails here), and importing the ops and modules does not import Dynamo (~1.2 s)."""
    import subprocess
    import sys

    code = ("import sys, mmfast.ops, mmfast.nn\n"
            "from mmfast.ops._host import constant_result\n"
            "assert 'torch._dynamo' not in sys.modules, 'importing mmfast imported torch._dynamo'\n"
            "def f(): return 1\n"
            "def g(): return 1\n"
            "constant_result(f)\n"
            "import torch._dynamo\n"
            "torch._dynamo.assume_constant_result(g)\n"
            "assert vars(f) == vars(g) and vars(f), (vars(f), vars(g))\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

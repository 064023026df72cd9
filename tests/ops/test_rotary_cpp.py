"""The ``cpp`` rotary backend (csrc/rotary.cpp) on CPU: forward and both gradients equal to the reference
composition bit for bit in fp32 (its roundings are the reference's, op by op), hence within the error bound
against fp64 as well; odd shapes, both layouts, broadcast cos/sin, outputs poisoned before the kernel writes
them, in place without grad, and its refusals."""
import pytest
import torch

from mmfast.ops import BackendUnavailableError
from mmfast.ops._env import cpp_extension
from mmfast.ops.llama import ROTARY_OP, rotary_embedding, rotary_embedding_reference
from mmfast.testing import assert_error_bound

pytestmark = pytest.mark.skipif(not hasattr(cpp_extension(), "rope"), reason="mmfast._C without the rotary kernel")



def _cos_sin(B, S, D, g, same_halves=True):
    pos = torch.randint(0, 4096, (B, S), generator=g).double()
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[..., None] * inv
    second = ang if same_halves else ang + torch.rand(ang.shape, generator=g, dtype=torch.float64)
    ang = torch.cat((ang, second), -1)
    return ang.cos(), ang.sin()


def _run(fn, q, k, cos, sin, gq, gk, dtype, unsqueeze_dim):
    qs, ks = (t.to(dtype).detach().clone().requires_grad_() for t in (q, k))
    c, s = cos.to(dtype), sin.to(dtype)
    qo, ko = fn(qs, ks, c, s, unsqueeze_dim)
    ((qo.double() * gq).sum() + (ko.double() * gk).sum()).backward()
    return [qo, ko, qs.grad, ks.grad]


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("B,HQ,HK,S,D,same_halves,cos_batch", [
    (2, 4, 2, 7, 16, True, 2), (1, 3, 3, 5, 6, True, 1), (3, 8, 1, 33, 64, False, 3), (2, 5, 5, 1, 128, True, 1)])
def test_rotary_cpp_equals_the_reference(B, HQ, HK, S, D, same_halves, cos_batch, unsqueeze_dim, poisoned_alloc):
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    # q, k as HF makes them: a (B, S, H·D) projection viewed (B, S, H, D) and, for dim 1, transposed
    q = torch.randn(B, S, HQ * D, generator=g, dtype=torch.float64).view(B, S, HQ, D)
    k = torch.randn(B, S, HK * D, generator=g, dtype=torch.float64).view(B, S, HK, D)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = _cos_sin(cos_batch, S, D, g, same_halves)  # (1, S, D) broadcasts over the batch
    gq, gk = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(k.shape, generator=g,
                                                                               dtype=torch.float64)

    def ours(q_, k_, c_, s_, u):
        return rotary_embedding(q_, k_, c_, s_, u, backend="cpp")

    got = _run(ours, q, k, cos, sin, gq, gk, torch.float32, unsqueeze_dim)
    low = _run(rotary_embedding_reference, q, k, cos, sin, gq, gk, torch.float32, unsqueeze_dim)
    ref = _run(rotary_embedding_reference, q, k, cos, sin, gq, gk, torch.float64, unsqueeze_dim)
    for name, o, lo, r in zip(("q_out", "k_out", "dq", "dk"), got, low, ref):
        assert o.dtype == torch.float32 and o.shape == lo.shape, name
        assert torch.equal(o, lo), f"{name}: differs from the reference's fp32 result"
        assert_error_bound(o, r, lo, name=name)


def test_rotary_cpp_in_place_without_grad(poisoned_alloc):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, 8, generator=g).transpose(1, 2)  # (B, H, S, D) views of (B, S, H, D)
    k = torch.randn(2, 5, 2, 8, generator=g).transpose(1, 2)
    cos, sin = (t.float() for t in _cos_sin(2, 5, 8, g))
    want_q, want_k = rotary_embedding_reference(q, k, cos, sin)
    with torch.no_grad():
        qo, ko = rotary_embedding(q, k, cos, sin, inplace=True, backend="cpp")
    assert qo is q and ko is k
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_rotary_cpp_refusals_and_auto_choice():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    cos, sin = (t.float() for t in _cos_sin(1, 3, 8, g))
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        rotary_embedding(q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16(), backend="cpp")
    with pytest.raises(BackendUnavailableError, match="cos/sin require grad"):
        rotary_embedding(q, k, cos.requires_grad_(), sin, backend="cpp")
    from mmfast.ops._dispatch import Facts

    # auto on CPU, fp32: before the reference (after triton_interpret, which the tests' TRITON_INTERPRET=1 enables)
    facts = Facts("cpu", torch.float32, {"head_dim": 8, "heads": 2, "cos_grad": False})
    order = list(ROTARY_OP.order)
    assert order.index("cpp") < order.index("reference") and ROTARY_OP.reasons("cpp", facts) == []
    assert ROTARY_OP.reasons("cpp", Facts("cpu", torch.bfloat16, {"head_dim": 8, "heads": 2}))


def test_rotary_cpp_refuses_an_extension_built_without_it(monkeypatch):
    """An mmfast._C older than csrc/rotary.cpp: the backend refuses, naming the rebuild, and auto moves on."""
    from types import SimpleNamespace

    from mmfast.ops import _env
    from mmfast.ops._dispatch import Facts

    monkeypatch.setattr(_env, "cpp_extension", lambda: SimpleNamespace())  # loads, but holds no kernel
    facts = Facts("cpu", torch.float32, {"head_dim": 12, "heads": 3, "cos_grad": False})
    assert any("rebuild" in r for r in ROTARY_OP.reasons("cpp", facts))
    # a shape no other test forces cpp with (an accepted forced choice is memoised per shape)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 3, 3, 12, generator=g), torch.randn(1, 1, 3, 12, generator=g)
    cos, sin = (t.float() for t in _cos_sin(1, 3, 12, g))
    with pytest.raises(BackendUnavailableError, match="rebuild"):
        rotary_embedding(q, k, cos, sin, backend="cpp")

"""Shared by the patch-rule test files (pytest puts this folder on sys.path): import it as ``patch_helpers``."""
from __future__ import annotations

import copy

import torch

import mmfast
from mmfast.models.patch import patched_rules
from mmfast.testing import assert_error_bound


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_patched(model, run, backend, kinds, expect_rules, name: str) -> None:
    """fp64 unpatched = reference, fp32 unpatched = PyTorch's own error; ``model`` patched (``kinds``,
    ``backend``; at least ``expect_rules``) must be within 2x that error (+ a few ulps) for ``run``'s
    result (called ``name``) and every parameter gradient. ``model`` is unpatched again at the end.

    ``run`` returns a loss, or a tensor (say every position's logits) that is then compared element by
    element and back-propagated with a fixed random cotangent. Compare tensors where you can: a single
    sum of many outputs can carry an fp32 error far below its terms' (their errors cancel by luck), which
    no kernel's different rounding is held to."""
    ref_model = copy.deepcopy(model).double()
    low_model = copy.deepcopy(model)
    results = []
    for m, patched in ((ref_model, False), (low_model, False), (model, True)):
        if patched:
            mmfast.patch(m, kinds=kinds, backend=backend)
            assert set(expect_rules) <= set(patched_rules(m)), patched_rules(m)
        torch.manual_seed(0)
        out = run(m, next(m.parameters()).dtype)
        if out.dim():
            g = torch.Generator().manual_seed(0)
            out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype))
        else:
            out.backward()
        results.append((out.detach(), grads(m)))
    (ref_out, ref_g), (low_out, low_g), (out, g) = results
    assert_error_bound(out, ref_out, low_out, name=name)
    assert ref_g.keys() == g.keys() and len(g) > 0
    scale = max(r.abs().max().item() for r in ref_g.values())
    for n in g:
        if ref_g[n].abs().max().item() < 1e-12 * scale:
            # Exactly zero in exact arithmetic (e.g. attention key biases: softmax is shift-invariant),
            # so both fp32 results are rounding noise: require noise-sized values, not a ratio of noises.
            assert g[n].abs().max().item() <= 1e-6 * scale, n
            continue
        assert_error_bound(g[n], ref_g[n], low_g[n], name=n)
    mmfast.unpatch(model)
    assert patched_rules(model) == []
    assert all("forward" not in vars(m) for m in model.modules())


def tiny_clip_config(layers: int = 2):
    """A transformers ``CLIPConfig``: ``layers`` text and vision layers of width 64 and 2 heads, 32-pixel
    images in 8-pixel patches, a 64-token vocabulary, projection 32."""
    import transformers

    return transformers.CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=32)

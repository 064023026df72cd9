"""The dispatcher: auto's choice against a fake preference table and fake device facts, refusals with
reasons, forced backends, one-line registration, the committed table, and ``mmfast info --explain``."""
from __future__ import annotations

import pytest
import torch

from mmfast.ops._dispatch import (
    _REGISTRY,
    AUTOGRAD,
    Backend,
    BackendUnavailableError,
    Facts,
    Op,
    check_backend_name,
    device_family,
    env,
    fake_env,
    fake_preferences,
    register,
)
from mmfast.ops.attention import ATTENTION_OP, shape_class

SM90 = {"cuda_available": True, "arch": "sm90", "interpret": False, "triton_error": None}


def _attn(mask="causal", s=2048, d=128, grad=True, device="cuda", dtype=torch.bfloat16, **kw):
    extra = {"head_dim": d, "heads": 32, "kv_heads": 32, "batch": 8, "seqlen_q": s, "seqlen_k": s, "mask": mask,
             "grad": grad, "softcap": False, "alibi": False, "dropout": False, "varlen": False, "kvcache": False,
             "paged": False, "need_lse": False, "empty_rows": False}
    extra.update(kw)
    return Facts(device, dtype, extra)


TABLE = {"flash_attention": {"sm90": {
    "causal/s2k/train": {"order": ["sdpa_cudnn", "flex", "triton"]},
    "full/s256/train": {"order": ["no_such_backend", "sdpa_flash", "triton"]},
    "*": {"order": ["triton", "sdpa_cudnn"]},
}}}


def test_shape_classes():
    assert shape_class(_attn()) == "causal/s2k/train"
    assert shape_class(_attn(mask="full", s=197)) == "full/s256/train"
    assert shape_class(_attn(mask="prefix", s=1600, grad=False)) == "prefix/s2k/infer"
    assert shape_class(_attn(s=5000)) == "causal/long/train"
    assert shape_class(_attn(varlen=True)) == "varlen-causal/s2k/train"
    assert shape_class(_attn(kvcache=True, s=4096)) == "decode/s4k/infer"


def test_auto_follows_the_table_row_of_the_device_family_and_shape_class():
    with fake_env(**SM90), fake_preferences(TABLE):
        assert device_family("cuda") == "sm90"
        assert ATTENTION_OP.select(_attn()) == "sdpa_cudnn"
        # the row's first backend refuses the call (it cannot return the lse): the next that can
        assert ATTENTION_OP.select(_attn(need_lse=True)) == "flex"
        # an unknown name in the table is skipped; the next runs
        assert ATTENTION_OP.select(_attn(mask="full", s=197, d=64)) == "sdpa_flash"
        # no row for the class: the family's "*" row
        assert ATTENTION_OP.select(_attn(mask="prefix", s=1600)) == "triton"
        order, source = ATTENTION_OP.candidates(_attn(mask="prefix", s=1600))
        assert order[:2] == ["triton", "sdpa_cudnn"] and "table sm90/*" in source and "default order" in source


def test_no_table_entry_means_the_default_order():
    with fake_env(cuda_available=True, arch="sm80", interpret=False, triton_error=None), fake_preferences(TABLE):
        assert device_family("cuda") == "sm80"
        order, source = ATTENTION_OP.candidates(_attn())
        assert order == list(ATTENTION_OP.order) and source == "default order"
        assert ATTENTION_OP.select(_attn()) == "triton"


def test_without_triton_the_vendor_kernels_take_what_they_support():
    fake = {**SM90, "triton_error": "triton is not importable (fake)"}
    with fake_env(**fake), fake_preferences({}):
        assert ATTENTION_OP.select(_attn()) == "sdpa_cudnn"  # flash_attn does not import here
        # prefix-LM: cuDNN and SDPA-flash take no dense mask, the efficient kernel does
        assert ATTENTION_OP.select(_attn(mask="prefix", s=1600)) == "sdpa_efficient"
        # softcap: no SDPA kernel has it; FlexAttention does
        assert ATTENTION_OP.select(_attn(softcap=True)) == "flex"
        # seeded dropout: only mmfast's kernels and the reference
        assert ATTENTION_OP.select(_attn(dropout=True)) == "reference"
        r = ATTENTION_OP.reasons("sdpa_cudnn", _attn(mask="prefix", s=1600, d=100))
        assert any("dense boolean mask" in x for x in r) and any("multiple of 8" in x for x in r)
        assert any("triton is not importable (fake)" in x for x in ATTENTION_OP.reasons("triton", _attn()))


def test_cpu_default_and_cpu_table():
    with fake_env(cuda_available=False, arch=None, interpret=False), fake_preferences({}):
        assert ATTENTION_OP.select(_attn(device="cpu", dtype=torch.float32)) == "reference"
    with fake_env(cuda_available=False, arch=None, interpret=False), \
            fake_preferences({"flash_attention": {"cpu": {"*": {"order": ["sdpa_flash", "sdpa_math"]}}}}):
        assert ATTENTION_OP.select(_attn(device="cpu", dtype=torch.float32)) == "sdpa_flash"
        assert ATTENTION_OP.select(_attn(device="cpu", dtype=torch.float32, mask="prefix")) == "sdpa_math"
    with fake_env(cuda_available=False, arch=None, interpret=True), fake_preferences({}):
        assert ATTENTION_OP.select(_attn(device="cpu", dtype=torch.float32)) == "triton_interpret"


def test_forced_backend_that_refuses_names_every_reason():
    with fake_env(**SM90), fake_preferences(TABLE):
        with pytest.raises(BackendUnavailableError) as e:
            ATTENTION_OP.select(_attn(softcap=True, need_lse=True), "sdpa_cudnn")
        msg = str(e.value)
        assert "'sdpa_cudnn' cannot run flash_attention" in msg and "softcap" in msg and "log-sum-exp" in msg
        assert ATTENTION_OP.select(_attn(), "triton") == "triton"
    with pytest.raises(ValueError, match="backend='cudnn'"):
        check_backend_name("cudnn")


def test_environment_variable_forces_and_is_checked(monkeypatch):
    with fake_env(**SM90), fake_preferences(TABLE):
        monkeypatch.setenv("MMFAST_BACKEND", "flex")
        assert ATTENTION_OP.select(_attn()) == "flex"
        monkeypatch.setenv("MMFAST_BACKEND", "nope")
        with pytest.raises(ValueError, match="MMFAST_BACKEND"):
            ATTENTION_OP.select(_attn())


def test_choose_memoises_the_choice_but_not_a_refusal(monkeypatch):
    """Op.choose (the ops' per-call path): a repeated call is a lookup, yet a forced backend that refuses
    raises on every call, MMFAST_BACKEND, fake_env, the table and a new registration are seen at once."""
    made = []
    op = register(Op("toy_choose", example=lambda dev: Facts(dev, torch.float32)))
    try:
        op.add("reference", Backend(forward=lambda x: x))
        op.add("my_kernel", Backend(devices=("cuda",), forward=lambda x: x))

        def facts():
            made.append(1)
            return Facts("cpu", torch.float32, {"n": 4})

        key = ("cpu", torch.float32, 4)
        assert op.choose(None, key, facts) is op.backend("reference")
        assert op.choose(None, key, facts) is op.backend("reference") and len(made) == 1  # memoised
        for _ in range(2):  # a refusal is not memoised: every call raises, naming the reason
            with pytest.raises(BackendUnavailableError, match="my_kernel.*needs CUDA tensors"):
                op.choose("my_kernel", key, facts)
        with pytest.raises(ValueError, match="backend='nope'"):
            op.choose("nope", key, facts)
        with fake_preferences({"toy_choose": {"cpu": {"*": {"order": ["my_kernel", "reference"]}}}}):
            assert op.choose(None, key, facts) is op.backend("reference")
        with fake_env(cuda_available=True), pytest.raises(BackendUnavailableError):
            op.choose("my_kernel", key, facts)
        monkeypatch.setenv("MMFAST_BACKEND", "my_kernel")
        with pytest.raises(BackendUnavailableError):
            op.choose(None, key, facts)
        monkeypatch.setenv("MMFAST_BACKEND", "nope")
        with pytest.raises(ValueError, match="MMFAST_BACKEND"):
            op.choose(None, key, facts)
        monkeypatch.delenv("MMFAST_BACKEND")
        op.add("my_cpu_kernel", Backend(devices=("cpu",), forward=lambda x: x))
        with fake_preferences({"toy_choose": {"cpu": {"*": {"order": ["my_cpu_kernel"]}}}}):
            assert op.choose(None, key, facts) is op.backend("my_cpu_kernel")
    finally:
        _REGISTRY.pop("toy_choose", None)


def test_a_new_backend_is_one_object_and_one_registration_line():
    calls = []

    class Doubler(Backend):
        doc = "x * 2"

        def supports(self, facts):
            return ["odd sizes: this toy takes even n only"] if facts.get("n", 0) % 2 else []

        def forward(self, x):
            calls.append("doubler")
            return x * 2

    op = register(Op("toy_double", example=lambda dev: Facts(dev, torch.float32, {"n": 4})))
    try:
        _toy(op, Doubler, calls)
    finally:
        _REGISTRY.pop("toy_double", None)


def _toy(op, Doubler, calls):
    op.add("reference", Backend(forward=lambda x: x + x, backward=AUTOGRAD))
    op.add("my_kernel", Doubler(devices=("cpu",)))  # the one line
    check_backend_name("my_kernel")  # the new name is accepted everywhere a backend is named
    f = Facts("cpu", torch.float32, {"n": 4})
    assert op.select(f) == "reference"  # the default order is the registration order
    with fake_preferences({"toy_double": {"cpu": {"*": {"order": ["my_kernel"]}}}}):
        assert op.select(f) == "my_kernel"
        assert op.backend("my_kernel").forward(torch.ones(2)).tolist() == [2.0, 2.0] and calls == ["doubler"]
        assert op.select(Facts("cpu", torch.float32, {"n": 3})) == "reference"
        lines = "\n".join(op.explain(Facts("cpu", torch.float32, {"n": 3})))
        assert "my_kernel" in lines and "refused: odd sizes" in lines and "* reference" in lines
    assert op.reasons("my_kernel", Facts("cuda", torch.float32, {"n": 4})) == ["runs on CPU tensors only, got device 'cuda'"]


def test_an_unimportable_backend_module_is_a_refusal_not_a_crash():
    op = Op("toy_missing")
    op.add("reference", Backend(forward=lambda x: x))
    op.add("triton", "mmfast.ops.backends.no_such_module:X")
    r = op.reasons("triton", Facts("cpu", torch.float32))
    assert len(r) == 1 and "no_such_module" in r[0] and "failed to import" in r[0]
    assert op.select(Facts("cpu", torch.float32)) == "reference"


def test_legacy_registration_still_works():
    op = Op("toy_legacy", impls={"reference": "plain", "triton": "mod", "triton_interpret": "mod"})
    assert op.order == ("triton", "triton_interpret", "reference")
    assert op.impl("reference") == "plain"
    assert any("needs CUDA tensors" in x for x in op.reasons("triton", Facts("cpu", torch.float32)))
    assert op.reasons("cpp", Facts("cpu", torch.float32)) == ["toy_legacy has no cpp implementation"]


def test_real_env_is_probed_once():
    assert env() is env()


def test_committed_preference_table_is_regenerated_from_the_csvs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "make_preferences.py"
    spec = importlib.util.spec_from_file_location("make_preferences", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0


def test_committed_table_prefers_cudnn_where_it_was_measured_faster():
    with fake_env(**SM90):
        assert ATTENTION_OP.select(_attn(mask="full", s=197, d=64)) == "sdpa_cudnn"  # ViT-B/16 train
        assert ATTENTION_OP.select(_attn(mask="prefix", s=1600)) == "triton"  # cuDNN refuses the prefix mask


def test_info_explain_attention(capsys):
    from mmfast.cli import main

    assert main(["info", "--explain", "attention", "--shape", "8,2048,32,128", "--causal", "--family", "sm90"]) == 0
    out = capsys.readouterr().out
    assert "shape class causal/s2k/train" in out
    assert "* sdpa_cudnn" in out and "chosen" in out
    assert "flash_attn        refused: " in out  # the package is not installed here
    assert main(["info", "--explain", "attention", "--shape", "2,64,2,32", "--prefix", "8", "--softcap", "3"]) == 0
    out = capsys.readouterr().out
    assert "sdpa_math         refused: softcap" in out
    assert main(["info", "--explain", "layer_norm"]) == 0
    assert "layer_norm: device cpu" in capsys.readouterr().out


def _make_preferences():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "make_preferences.py"
    spec = importlib.util.spec_from_file_location("make_preferences_t", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_csv(tmp_path, rows):
    import csv

    from mmfast.bench.harness import COLUMNS

    path = tmp_path / "attention.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for dev, prov, mode, name, s, causal, ms, err in rows:
            w.writerow({"bench": "attention", "provider": prov, "mode": mode, "x_name": "case", "x": 0,
                        "params": f"name={name};B=8;S={s};H=32;D=128;causal={causal};dtype=bf16;device=cuda",
                        "median_ms": ms, "error": err, "device": dev})
    return str(path)


def test_table_built_from_csvs_orders_by_time_and_families(tmp_path):
    mp = _make_preferences()
    path = _fake_csv(tmp_path, [
        ("NVIDIA H100 80GB HBM3", "mmfast-triton", "fwd+bwd", "llava_2k", 2048, True, 4.0, ""),
        ("NVIDIA H100 80GB HBM3", "sdpa-cudnn", "fwd+bwd", "llava_2k", 2048, True, 2.0, ""),
        ("NVIDIA H100 80GB HBM3", "flex", "fwd+bwd", "llava_2k", 2048, True, 3.0, ""),
        ("NVIDIA H100 80GB HBM3", "flash-attn", "fwd+bwd", "llava_2k", 2048, True, "", "skipped: budget"),
        ("NVIDIA H200", "mmfast-triton", "fwd+bwd", "llava_2k", 2048, True, 1.5, ""),
        ("NVIDIA H200", "sdpa-cudnn", "fwd+bwd", "llava_2k", 2048, True, 1.8, ""),
        ("NVIDIA A100-SXM4-80GB", "mmfast-triton", "fwd", "vit", 197, False, 1.0, ""),
        ("NVIDIA A100-SXM4-80GB", "sdpa-flash", "fwd", "vit", 197, False, 0.5, ""),
        ("NVIDIA A100-SXM4-80GB", "mmfast-auto", "fwd", "vit", 197, False, 0.51, ""),
    ])
    ops = mp.build([path])["ops"]["flash_attention"]
    row = ops["sm90"]["causal/s2k/train"]
    # H100: cudnn 1.0x, triton 2.0x, flex 1.5x; H200: triton 1.0x, cudnn 1.2x -> geo means cudnn 1.095, flex 1.5,
    # triton 1.414; the errored flash-attn row is left out
    assert row["order"] == ["sdpa_cudnn", "triton", "flex"]
    assert ops["sm80"]["full/s256/infer"]["order"] == ["sdpa_flash", "triton"]  # mmfast-auto is not a backend
    with fake_env(**{**SM90, "arch": "sm80"}), fake_preferences({"flash_attention": ops}):
        assert ATTENTION_OP.select(_attn(mask="full", s=197, d=64, grad=False)) == "sdpa_flash"


def test_auto_rule_report(tmp_path):
    mp = _make_preferences()
    path = _fake_csv(tmp_path, [
        ("H200", "mmfast-auto", "fwd+bwd", "vit", 197, False, 1.02, ""),
        ("H200", "sdpa-cudnn", "fwd+bwd", "vit", 197, False, 1.00, ""),
        ("H200", "mmfast-auto", "fwd+bwd", "llava", 2048, True, 1.10, ""),
        ("H200", "sdpa-cudnn", "fwd+bwd", "llava", 2048, True, 1.00, ""),
        ("H200", "sdpa", "fwd+bwd", "llava", 2048, True, 0.50, ""),  # not a backend: not a rival
    ])
    lines, bad = mp.rule_report([path])
    assert bad == 1 and len(lines) == 2
    assert any(ln.startswith("SLOW") and "llava" in ln and "1.100x" in ln for ln in lines)
    assert any(ln.startswith("ok") and "vit" in ln for ln in lines)


def test_contrastive_table_needs_both_backends_side_by_side(tmp_path):
    """clip_loss rows come from cards where gemm and triton ran in the same sweep; a CSV that timed the fused
    kernel alone (or the reference, which holds the N×N logits and is never ranked) makes no row."""
    import csv

    from mmfast.bench.harness import COLUMNS
    from mmfast.ops.contrastive import CLIP_OP

    mp = _make_preferences()
    path = tmp_path / "contrastive.csv"
    rows = [("NVIDIA H200", "mmfast-gemm", 32768, 14.0), ("NVIDIA H200", "mmfast-triton", 32768, 106.0),
            ("NVIDIA H200", "mmfast-gemm", 1024, 0.30), ("NVIDIA H200", "mmfast-triton", 1024, 0.20),
            ("NVIDIA H100 80GB HBM3", "mmfast-triton", 8192, 10.3),
            ("NVIDIA H100 80GB HBM3", "mmfast-reference", 8192, 1.9)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for dev, prov, n, ms in rows:
            w.writerow({"bench": "contrastive", "provider": prov, "mode": "fwd+bwd", "x_name": "N", "x": n,
                        "params": f"N={n};d=768;dtype=bf16;device=cuda;loss=clip", "median_ms": ms, "error": "",
                        "device": dev})
    ops = mp.build([str(path)])["ops"]["clip_loss"]["sm90"]
    assert ops["k32k"]["order"] == ["gemm", "triton"] and ops["k<=2k"]["order"] == ["triton", "gemm"]
    assert "k8k" not in ops  # one backend there: no evidence of an order
    with fake_env(**SM90), fake_preferences({"clip_loss": {"sm90": ops}}):
        assert CLIP_OP.select(Facts("cuda", torch.bfloat16, {"k": 1024})) == "triton"
        assert CLIP_OP.select(Facts("cuda", torch.bfloat16, {"k": 32768})) == "gemm"

"""Test set-up shared by every test module.

TRITON_INTERPRET=1 is set before mmfast (and Triton) are imported so that the Triton kernels run
under the interpreter on CPU tensors. On a CUDA machine set MMFAST_TEST_CUDA=1 to keep the compiled
kernels instead (benchmarks/gpu_suite.sh does).

MMFAST_ATTN_AUTOTUNE=0 (unless already set): the attention kernels launch fixed per-head-dim configs
instead of autotuning every shape and mask combination, which keeps the GPU suite's tests inside
its time box. mmfast.ops._attention_triton reads it once, at import, so it is set here, before any
test module imports mmfast (no effect under the interpreter, which never autotunes).
"""
import os

if os.environ.get("MMFAST_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MMFAST_ATTN_AUTOTUNE", "0")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _cuda() -> bool:
    return os.environ.get("MMFAST_TEST_CUDA") == "1" and torch.cuda.is_available()


@pytest.fixture
def device() -> str:
    """The device Triton-backend tests run on: cuda on the GPU suite, cpu (interpreter) elsewhere."""
    return "cuda" if _cuda() else "cpu"


@pytest.fixture
def triton_backend() -> str:
    return "triton" if _cuda() else "triton_interpret"


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every torch.empty / empty_like during the test returns NaN-filled memory."""
    from mmfast.testing import poison_

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))


def pytest_collection_modifyitems(config, items):
    # MMFAST_TEST_CUDA_ONLY=1 (the GPU suite): keep only tests that can touch CUDA, i.e. those
    # marked `gpu` or taking the `device` / `triton_backend` fixtures; CPU-only tests ran in CI.
    if os.environ.get("MMFAST_TEST_CUDA_ONLY") == "1":
        keep = [i for i in items if "gpu" in i.keywords or {"device", "triton_backend"} & set(i.fixturenames)]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    # MMFAST_TEST_FAILLOG=PATH (the GPU suite): append each failure's traceback to PATH the moment
    # it is reported, so a run cut short by its time limit still says why its failures failed.
    # Written by the xdist controller only (workers forward their reports to it).
    path = os.environ.get("MMFAST_TEST_FAILLOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"\n===== {report.nodeid} ({report.when})\n{report.longreprtext}\n")

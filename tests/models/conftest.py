"""Fixtures shared by the LLaVA generation tests (test_llava_generate.py, test_serving.py): the tiny preset with
mmfast's kernels (reference backend) and without, one build per test module (module scope)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def fast():
    from mmfast.models.llava import model as ml

    return ml.build_llava("tiny", kernels=True, seed=0, backend="reference")


@pytest.fixture(scope="module")
def plain():
    from mmfast.models.llava import model as ml

    return ml.build_llava("tiny", kernels=False, seed=0)

"""fused_linear_cross_entropy with a DeepSpeed ZeRO-3 partitioned weight (1-process gloo, CPU).

The engine runs in a subprocess (DeepSpeed sets process-wide state); the fused loss must reproduce
the unpatched model's loss and full gradients."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmfast.utils.ports import free_port

pytest.importorskip("deepspeed")
WORKER = Path(__file__).with_name("zero3_flce_worker.py")


def _free_port() -> int:
    return free_port()  # below the ephemeral range: no outgoing connection takes it meanwhile


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", ["head", "llama"])
@pytest.mark.parametrize("backend", ["triton_interpret", "reference"])
def test_flce_zero3(case, backend):
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(WORKER), case, backend], env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("weight" in n for n in out["partitioned"]), out["partitioned"]  # the head really was partitioned
    l0, l1 = out["loss"]
    assert abs(l0 - l1) <= 1e-6 * max(1.0, abs(l0)), out["loss"]
    assert out["grad_max_diff"], "no gradients compared"
    for name, d in out["grad_max_diff"].items():
        assert d <= 1e-6 * max(1.0, out["grad_max_abs"][name]), (name, d)

"""Full fine-tuning of a patched tiny HF LLaMA under 2-rank gloo DeepSpeed ZeRO-3 (CPU).

Every parameter trains, the LM head included, so the ``causal_lm`` FLCE rule's loss runs on a
partitioned, trainable ``lm_head.weight``. Two optimizer steps per model (the second with
``num_items_in_batch``) must give the unpatched model's losses on each rank, its first-step full
gradients and its parameters after both steps. The ranks run as subprocesses (zero3_patch_train_worker.py).
"""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfast.utils.ports import free_port

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("zero3_patch_train_worker.py")
WORLD = 2
REL = 1e-6  # fp32 end to end: the patched and plain runs differ only by summation order


def _free_port() -> int:
    return free_port()  # below the ephemeral range: no outgoing connection takes it meanwhile


def _run_ranks(case: str, backend: str, logs: Path) -> list[dict]:
    port = str(_free_port())
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in range(WORLD):
            env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), TRITON_INTERPRET="1",
                       OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
            # Files, not pipes: the wait below never drains a pipe, and DeepSpeed logs plenty.
            out = stack.enter_context(open(logs / f"rank{rank}.out", "w"))
            err = stack.enter_context(open(logs / f"rank{rank}.err", "w"))
            procs.append(subprocess.Popen([sys.executable, str(WORKER), case, backend], env=env, stdout=out,
                                          stderr=err))
            stack.callback(lambda p=procs[-1]: p.poll() is None and p.kill())
        deadline = time.monotonic() + 600
        # A rank that fails leaves the other blocked in a collective: stop waiting at the first failure.
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    for p in procs:
        p.wait()
    # Name the rank that failed on its own, not a peer this test killed (rc -9) once it had.
    failed = sorted(range(WORLD), key=lambda r: (procs[r].returncode == -9, r))
    for rank in failed:
        rc = procs[rank].returncode
        assert rc == 0, (f"rank {rank} (rc {rc}): {(logs / f'rank{rank}.err').read_text()[-3000:]}\n"
                         f"stdout: {(logs / f'rank{rank}.out').read_text()[-1500:]}")
    outs = []
    for rank, p in enumerate(procs):
        outs.append(json.loads((logs / f"rank{rank}.out").read_text().strip().splitlines()[-1]))
    return outs


def _assert_close(diffs: dict, scales: dict, what: str):
    assert diffs, f"no {what} compared"
    for name, d in diffs.items():
        assert d <= REL * max(1.0, scales[name]), (what, name, d)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case, backend", [("untied", "triton_interpret"), ("tied", "reference"),
                                           ("zero_init", "reference")])
def test_patched_llama_full_finetune_zero3(case, backend, tmp_path):
    outs = _run_ranks(case, backend, tmp_path)
    assert [o["rank"] for o in outs] == list(range(WORLD))
    assert outs[0]["loss"][0] != outs[1]["loss"][0], "both ranks saw the same batch"
    for o in outs:
        for plain, patched in zip(*o["loss"]):
            assert abs(plain - patched) <= REL * max(1.0, abs(plain)), o["loss"]
        _assert_close(o["grad_max_diff"], o["grad_max_abs"], "gradients")
        _assert_close(o["param_max_diff"], o["param_max_abs"], "updated parameters")
        head = "model.embed_tokens.weight" if case == "tied" else "lm_head.weight"
        assert head in o["param_moved"]
        # Every parameter really trained (the head too), by far more than the runs differ.
        for name, moved in o["param_moved"].items():
            assert moved > 1e-4 and moved > 100 * o["param_max_diff"][name], (name, moved)

"""mmfast.training.checkpoint without DeepSpeed: manifests, the choice of checkpoint on resume, weights-only
loading, RNG state as tensors, and the metrics rows kept on resume."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from mmfast.training import checkpoint as ck


def _fake_checkpoint(ckdir, step, world=2, files=None):
    """A committed checkpoint as Checkpointer.save leaves it (files, then the manifest)."""
    folder = ckdir / f"step{step}"
    folder.mkdir(parents=True)
    files = files or {"mp_rank_00_model_states.pt": os.urandom(300), "rng_rank0.pt": os.urandom(40)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = {"format": ck.FORMAT, "step": step, "tag": folder.name, "world_size": world,
                "files": {n: dict(zip(("size", "sha256"), ck._hash_file(folder / n))) for n in files}}
    (folder / ck.MANIFEST).write_text(json.dumps(manifest))
    return folder


def _checkpointer(tmp_path, world=2):
    return ck.Checkpointer(tmp_path, 0, world, keep=2, barrier=lambda: None, gather=lambda x: [x])


def test_verify_names_the_bad_file(tmp_path):
    folder = _fake_checkpoint(tmp_path / "checkpoints", 4)
    assert ck.verify(folder, 2) == []
    data = (folder / "rng_rank0.pt").read_bytes()
    (folder / "rng_rank0.pt").write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit
    assert ck.verify(folder, 2) == [f"{folder / 'rng_rank0.pt'}: sha256 differs from the manifest (corrupted or replaced)"]
    (folder / "rng_rank0.pt").write_bytes(data[:10])
    assert "10 bytes, the manifest says 40" in ck.verify(folder, 2)[0]
    (folder / "rng_rank0.pt").unlink()
    assert ck.verify(folder, 2) == [f"{folder / 'rng_rank0.pt'}: missing"]
    (folder / "rng_rank0.pt").write_bytes(data)
    (folder / "extra.pt").write_bytes(b"x")
    assert ck.verify(folder, 2) == [f"{folder / 'extra.pt'}: not part of the checkpoint (not in its manifest)"]
    (folder / "extra.pt").unlink()
    assert "saved by 2 ranks; this run has 4" in ck.verify(folder, 4)[0]
    (folder / ck.MANIFEST).unlink()
    assert "manifest.json missing (the save did not complete)" in ck.verify(folder, 2)[0]


@pytest.mark.parametrize("latest", [None, "", "step9", "../../etc", "garbage\x00"])
def test_resume_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, latest):
    ckdir = tmp_path / "checkpoints"
    _fake_checkpoint(ckdir, 2)
    _fake_checkpoint(ckdir, 4)
    (ckdir / "step6").mkdir()  # a save that died before its manifest
    (ckdir / "step6" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    if latest is not None:
        (ckdir / "latest").write_text(latest)
    folder, notes = _checkpointer(tmp_path).resolve("latest")
    assert folder == ckdir / "step4"
    assert notes[-1] == "resuming from step4, the newest complete checkpoint" and len(notes) == 2


def test_resume_latest_damaged_with_no_fallback_is_one_clear_error(tmp_path):
    ckdir = tmp_path / "checkpoints"
    folder = _fake_checkpoint(ckdir, 2)
    (ckdir / "latest").write_text("step2")
    assert _checkpointer(tmp_path).resolve("latest") == (folder, [])
    (folder / "rng_rank0.pt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"no complete checkpoint in .*step2 \(latest\) is damaged: .*rng_rank0"):
        _checkpointer(tmp_path).resolve("latest")
    with pytest.raises(ck.CheckpointError, match="saved by 2 ranks; this run has 1"):
        _checkpointer(tmp_path, world=1).resolve(str(_fake_checkpoint(ckdir, 3)))
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint: .*rng_rank0"):
        _checkpointer(tmp_path).resolve(str(folder))


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    ckdir = tmp_path / "checkpoints"
    for s in (1, 2, 3, 10):
        _fake_checkpoint(ckdir, s)
    c = _checkpointer(tmp_path)
    c._prune(keep_tag="step10")
    assert sorted(p.name for p in ckdir.iterdir()) == ["step10", "step3"]  # by step number, not by name
    # Resumed from step 3, the run saves step 4: step 10 is an older attempt's, kept but not counted.
    _fake_checkpoint(ckdir, 4)
    c._prune(keep_tag="step4")
    assert sorted(p.name for p in ckdir.iterdir()) == ["step10", "step3", "step4"]


def test_a_damaged_latest_falls_back_before_it_not_to_a_later_attempt(tmp_path):
    ckdir = tmp_path / "checkpoints"
    for s in (2, 4, 20):  # step 20: left by an attempt this run resumed before
        _fake_checkpoint(ckdir, s)
    (ckdir / "latest").write_text("step4")
    (ckdir / "step4" / "rng_rank0.pt").write_bytes(b"")
    folder, notes = _checkpointer(tmp_path).resolve("latest")
    assert folder == ckdir / "step2" and notes[-1] == "resuming from step2, the newest complete checkpoint"


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_load_refuses_pickles_that_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "rng_rank0.pt"
    torch.save({"python": _Planted(marker)}, path)
    with pytest.raises(ck.CheckpointError, match=f"{path}: refused"):
        ck.safe_load(path)
    assert not marker.exists()
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ck.CheckpointError, match=f"{path}: unreadable"):
        ck.safe_load(path)
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.safe_load(tmp_path / "nope.pt")


def test_rng_state_round_trips_through_weights_only_files(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # a cached gaussian in each generator's state
    np.random.standard_normal()
    state = ck.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expect = (random.random(), float(np.random.standard_normal()), float(torch.rand(1)), random.gauss(0, 1))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ck.set_rng_state(ck.safe_load(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.standard_normal()), float(torch.rand(1)), random.gauss(0, 1)) == expect


def test_resume_keeps_only_metrics_rows_up_to_the_resumed_step(tmp_path):
    from mmfast.training.engine import Run

    run = Run.__new__(Run)
    run.metrics_path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4, 5)]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut by a crash
    run._truncate_metrics(3)
    assert [json.loads(x) for x in run.metrics_path.read_text().splitlines()] == rows[:3]

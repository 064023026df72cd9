"""Faults injected into real training runs (the CLIP recipe, DeepSpeed on CPU ranks): a rank killed
inside a save, pickles planted in a checkpoint, a corrupted optimizer shard, `mmfast train` killed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("deepspeed")

from mmfast.training import checkpoint as ck

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmfast.data.synthetic import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, 40, 32, seed=1, media=False)  # 32 train images x 2 captions = 64 pairs
    return out


def _cmd(world, out, *args, nproc=1):
    return [sys.executable, "-m", "mmfast.cli", "train", "clip", "--nproc", str(nproc), "--config", "tiny",
            "--data", str(world), "--out", str(out), "--batch-size", "8", "--lr", "2e-3", "--warmup", "1",
            "--threads", "1", "--no-kernels", "--no-export", *map(str, args)]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _run(world, out, *args, nproc=1, ok=True, **env):
    proc = subprocess.run(_cmd(world, out, *args, nproc=nproc), check=False, env=_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _rehash(folder: Path) -> None:
    """Rewrite the manifest to match the files, as someone who can write the folder could."""
    m = json.loads((folder / "manifest.json").read_text())
    for rel in m["files"]:
        size, sha = ck._hash_file(folder / rel)
        m["files"][rel] = {"size": size, "sha256": sha}
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_killed_inside_a_save_never_corrupts_latest(world, tmp_path):
    run = tmp_path / "run"
    # Rank 1 dies halfway through writing its first file of the step-4 checkpoint.
    proc = _run(world, run, "--steps", 6, "--save-every", 2, "--deepspeed-config", "zero2", nproc=2, ok=False,
                MMFAST_FAULT="save:4:1")
    assert proc.returncode != 0
    ckdir = run / "checkpoints"
    assert (ckdir / "latest").read_text() == "step2"  # the last complete checkpoint
    assert not (ckdir / "step4").exists()  # the half-written one never became a checkpoint
    assert ck.verify(ckdir / "step2", 2) == []
    crashed = _rows(run)
    assert [r["step"] for r in crashed] == [1, 2, 3, 4]  # rank 0 logged step 4 before the save

    proc = _run(world, run, "--steps", 6, "--save-every", 2, "--deepspeed-config", "zero2", "--resume", "latest", nproc=2)
    assert "resumed from" in proc.stderr and "step2" in proc.stderr
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3-4 replaced, not duplicated
    assert [r["loss"] for r in rows[:4]] == [r["loss"] for r in crashed]  # the same steps, exactly
    assert (ckdir / "latest").read_text() == "step6"
    assert sorted(p.name for p in ckdir.glob("step*")) == ["step4", "step6"]


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):
    """One rank, ZeRO-2, checkpoints at steps 1, 2 and 3."""
    run = tmp_path_factory.mktemp("saved") / "run"
    _run(world, run, "--steps", 3, "--save-every", 1, "--keep-checkpoints", 3)
    return run


def _copy(saved: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    return run


class _Planted:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rng_rank0.pt", "mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_pickle_planted_in_a_checkpoint_never_runs(saved, tmp_path, name, world):
    import torch

    run = _copy(saved, tmp_path)
    target = run / "checkpoints" / "step3" / name
    marker = tmp_path / "pwned"
    torch.save({"payload": _Planted(marker)}, target)
    # The manifest catches the swap: latest is damaged, the run falls back to step 2.
    problems = ck.verify(target.parent, 1)
    assert any(name in p and ("sha256 differs" in p or "the manifest says" in p) for p in problems), problems
    # Someone who can write the folder can rewrite the manifest too: the loader itself must refuse.
    _rehash(target.parent)
    proc = _run(world, run, "--steps", 3, "--resume", "latest", ok=False)
    assert proc.returncode != 0
    assert str(target) in proc.stderr and "refused" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def _corrupt_largest_tensor(path: Path, nbytes: int = 12 * 1024) -> None:
    """Overwrite bytes in the middle of the largest stored tensor (size unchanged, as in the report)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        n = min(nbytes, info.file_size // 2)
        f.seek(start + info.file_size // 4)
        f.write(b"\xff" * n)


@pytest.mark.slow
def test_a_corrupted_optimizer_shard_is_refused_with_its_name(saved, tmp_path, world):
    run = _copy(saved, tmp_path)
    shard = run / "checkpoints" / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    _corrupt_largest_tensor(shard)
    assert shard.stat().st_size == size
    # The manifest names the file; resume falls back to step 2 and finishes the run.
    proc = _run(world, run, "--steps", 3, "--resume", "latest")
    assert f"{shard}: sha256 differs" in proc.stderr and "resuming from step2" in proc.stderr
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
    assert ck.verify(run / "checkpoints" / "step3", 1) == []  # step 3 saved again, intact

    # With the manifest rewritten to match, the loaded values themselves are checked.
    run2 = _copy(saved, tmp_path / "b")
    shard = run2 / "checkpoints" / "step3" / shard.name
    _corrupt_largest_tensor(shard)
    _rehash(shard.parent)
    summary = (run2 / "train_summary.json").read_bytes()
    proc = _run(world, run2, "--steps", 3, "--resume", "latest", ok=False)
    assert proc.returncode == 2
    assert "non-finite values after loading" in proc.stderr and str(shard) in proc.stderr, proc.stderr[-3000:]
    assert "NaN" in proc.stderr and "optimizer" in proc.stderr
    assert "Traceback" not in proc.stderr  # one clear line per rank
    assert (run2 / "train_summary.json").read_bytes() == summary  # nothing trained, nothing rewritten


def _pids_with(*texts: str) -> list[int]:
    """Processes whose command line holds every one of ``texts`` (other tests may train beside this one)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(t in cmd for t in texts):
                pids.append(int(d.name))
    return pids


def _listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on (hex, as /proc/net/tcp* writes them)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes and f[3] == "0A":
                out.append(f[1].split(":")[0])
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopping_mmfast_train_stops_every_rank(world, tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(world, run, "--steps", 100000, nproc=2), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        ranks = _pids_with("mmfast.training.clip --local_rank", str(run))
        assert len(ranks) == 2, ranks
        # One node: the rendezvous store and gloo listen on the loopback interface only.
        for pid in ranks:
            addrs = _listening(pid)
            assert all(a in ("0100007F", "00000000000000000000000001000000") for a in addrs), (pid, addrs)
        assert any(_listening(pid) for pid in ranks)  # rank 0 serves the store
        os.kill(proc.pid, sig)
        deadline = time.monotonic() + 10
        while _pids_with(str(run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _pids_with(str(run)) == [], "ranks or launchers still alive 10 s after the signal"
        if sig == signal.SIGTERM:
            assert proc.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        for pid in _pids_with(str(run)):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
    assert not (run / "train_summary.json").exists()  # nothing ran to the end

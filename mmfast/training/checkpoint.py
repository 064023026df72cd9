"""Checkpoints that survive faults and cannot run code.

Commit protocol (:meth:`Checkpointer.save`, every rank calls it):

1. every rank writes its DeepSpeed files and ``rng_rank{r}.pt`` into ``checkpoints/.incoming/stepN``;
2. barrier; the files are fsynced and hashed (each rank a share) and the hashes gathered on rank 0;
3. rank 0 writes ``manifest.json`` (files, sizes, sha256, step, world size, mmfast / DeepSpeed / torch
   versions), renames the folder to ``checkpoints/stepN`` and then replaces ``checkpoints/latest``
   (write + rename); it keeps the newest ``--keep-checkpoints`` complete checkpoints;
4. barrier.

A folder without a valid manifest is not a checkpoint: a rank killed anywhere in 1-3 leaves
``latest`` on the previous complete step. ``--resume latest`` verifies the manifest (sizes and hashes)
and, where ``latest`` is damaged, names the bad file and resumes from the newest complete checkpoint.

Nothing is unpickled beyond tensors and plain data: every file is read with
``torch.load(weights_only=True)`` (DeepSpeed's shards through :func:`install_safe_loader`, which
replaces DeepSpeed's checkpoint engine, whose ``load`` unpickles with ``weights_only=False``), with the
few plain-data DeepSpeed types (loss scaler, fragment addresses, the ZeRO stage enum) allow-listed.
After loading, :func:`nonfinite_report` checks every parameter and optimizer state.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmfast.utils.io import atomic_open, atomic_torch_save, atomic_write_json

FORMAT = "mmfast-checkpoint/1"
MANIFEST = "manifest.json"
INCOMING = ".incoming"
TAG = re.compile(r"^step(\d+)$")
# Fault injection for the fault tests only: "save:STEP:RANK" makes that rank die (SIGKILL) halfway
# through writing its first file of the step-STEP checkpoint, leaving it truncated.
FAULT_ENV = "MMFAST_FAULT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or loaded; the message names the file."""


def step_of(tag: str) -> int | None:
    m = TAG.match(tag)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- safe loading
def _allowed_globals() -> list:
    """DeepSpeed's plain-data types found in its checkpoints (no code runs when they are rebuilt)."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return allowed


def safe_load(path: str | os.PathLike, map_location=None):
    """``torch.load(weights_only=True)`` with DeepSpeed's plain-data types allowed; errors name the file."""
    import pickle

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: it holds objects beyond tensors and plain data, which could run "
                              f"code when unpickled ({reason[:300]})") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0][:300]})") from None


def _fault_here(path: str) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    m = re.fullmatch(r"save:(\d+):(\d+)", spec)
    return bool(m) and f"{os.sep}step{m.group(1)}{os.sep}" in path and os.environ.get("RANK") == m.group(2)


def install_safe_loader(engine) -> list[Path]:
    """Replace the DeepSpeed engine's checkpoint engine by one that loads with ``weights_only=True``.

    Returns the list the new engine appends every loaded path to (the integrity check names them).
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__} is not supported "
                              "(mmfast loads checkpoints through TorchCheckpointEngine with weights_only=True)")
    loaded: list[Path] = []

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            loaded.append(Path(path))
            return safe_load(path, map_location)

        def save(self, state_dict, path):
            if _fault_here(str(path)):  # fault tests: die with a half-written file
                buf = io.BytesIO()
                torch.save(state_dict, buf)
                with open(path, "wb") as f:
                    f.write(buf.getvalue()[: buf.tell() // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            super().save(state_dict, path)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe
    return loaded


# --------------------------------------------------------------------------- RNG state as tensors
def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and numbers: loadable with weights_only."""
    version, py, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, torch.tensor(py, dtype=torch.int64), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    version, py, gauss = s["python"]
    random.setstate((version, tuple(int(x) for x in py.tolist()), gauss))
    keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --------------------------------------------------------------------------- manifests
def _hash_file(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size, sha256) of ``path``; ``sync``: flush it to disk first (a save: the writer may be another rank)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("mmfast", "deepspeed"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def verify(folder: Path, world_size: int | None = None) -> list[str]:
    """What is wrong with checkpoint ``folder`` (empty: complete and intact)."""
    mpath = folder / MANIFEST
    if not folder.is_dir():
        return [f"{folder}: no such checkpoint folder"]
    if not mpath.is_file():
        return [f"{mpath} missing (the save did not complete)"]
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{mpath}: not a valid manifest ({e})"]
    if world_size is not None and manifest.get("world_size") != world_size:
        saved = manifest.get("world_size")
        why = "ZeRO partitions cannot be re-sharded on resume"
        return [f"{folder} was saved by {saved} ranks; this run has {world_size} ({why})"]
    problems = []
    for rel, meta in sorted(files.items()):
        p = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{mpath}: file name {rel!r} leaves the folder")
        elif not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, the manifest says {meta['size']} (truncated or replaced)")
        elif _hash_file(p)[1] != meta["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest (corrupted or replaced)")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in files:
            problems.append(f"{p}: not part of the checkpoint (not in its manifest)")
    return problems


class Checkpointer:
    """Saves and finds the checkpoints of one run folder (``OUT/checkpoints``); see the module docstring.

    ``barrier`` and ``gather`` are the process group's (``gather(obj)`` returns every rank's ``obj``).
    """

    def __init__(self, out: Path, rank: int, world: int, keep: int, barrier, gather):
        if keep < 1:
            raise ValueError(f"--keep-checkpoints must be >= 1, got {keep}")
        self.dir = Path(out) / "checkpoints"
        self.rank, self.world, self.keep = rank, world, keep
        self.barrier, self.gather = barrier, gather

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, exclude_frozen: bool = False) -> Path:
        tag = f"step{step}"
        incoming = self.dir / INCOMING / tag
        if self.rank == 0:
            shutil.rmtree(incoming, ignore_errors=True)  # a crashed earlier attempt at this step
            incoming.mkdir(parents=True)
        self.barrier()
        engine.save_checkpoint(str(incoming.parent), tag=tag, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
        atomic_torch_save(rng_state(), incoming / f"rng_rank{self.rank}.pt")
        self.barrier()
        files = sorted(p for p in incoming.rglob("*") if p.is_file())
        mine = {p.relative_to(incoming).as_posix(): _hash_file(p, sync=True) for p in files[self.rank::self.world]}
        hashes = {}
        for part in self.gather(mine):
            hashes.update(part)
        final = self.dir / tag
        if self.rank == 0:
            atomic_write_json(incoming / MANIFEST, {
                "format": FORMAT, "step": step, "tag": tag, "world_size": self.world,
                "zero_stage": engine.zero_optimization_stage(), "created": time.time(), "versions": _versions(),
                "files": {rel: {"size": size, "sha256": sha} for rel, (size, sha) in sorted(hashes.items())}})
            _fsync_dir(incoming)
            if final.exists():  # an older (possibly damaged) checkpoint of the same step: replace it
                old = self.dir / INCOMING / f"{tag}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(incoming, final)
            _fsync_dir(self.dir)
            with atomic_open(self.dir / "latest", "w", encoding="utf-8") as f:
                f.write(tag)
            _fsync_dir(self.dir)
            self._prune(keep_tag=tag)
        self.barrier()
        return final

    def complete(self) -> list[Path]:
        """Checkpoint folders with a manifest, newest step first (not verified)."""
        found = [p for p in self.dir.glob("step*") if step_of(p.name) is not None and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: step_of(p.name), reverse=True)

    def _prune(self, keep_tag: str) -> None:
        """Keep the newest ``keep`` complete checkpoints up to this step. Later steps (left by an earlier
        attempt this run was resumed from before) stay until this run saves those steps again."""
        step = step_of(keep_tag)
        for p in [p for p in self.complete() if step_of(p.name) <= step][self.keep:]:
            if p.name != keep_tag:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ resume
    def resolve(self, resume: str) -> tuple[Path, list[str]]:
        """The verified checkpoint folder for ``--resume`` and notes to print (rank 0 calls this).

        ``latest``: the folder ``checkpoints/latest`` names, or, if it is damaged or missing, the
        newest complete one (the notes say which file was bad). A folder: that one, or an error.
        """
        notes: list[str] = []
        if resume != "latest":
            folder = Path(resume)
            problems = verify(folder, self.world)
            if problems:
                raise CheckpointError(f"--resume {resume}: not a complete checkpoint: " + "; ".join(problems[:5]))
            return folder, notes
        latest = self.dir / "latest"
        tag = latest.read_text(encoding="utf-8", errors="replace").strip() if latest.is_file() else None
        if tag is not None and step_of(tag) is None:
            notes.append(f"{latest} names {tag[:80]!r}, not a checkpoint of this run")
        elif tag is None:
            notes.append(f"{latest} missing")
        else:
            problems = verify(self.dir / tag, self.world)
            if not problems:
                return self.dir / tag, notes
            if "ranks; this run has" in problems[0]:
                raise CheckpointError(f"--resume latest: {problems[0]}")
            notes.append(f"checkpoint {tag} (latest) is damaged: " + "; ".join(problems[:5]))
        # Damaged latest: the newest complete checkpoint before it (later ones are an older attempt's).
        before = step_of(tag) if tag is not None and step_of(tag) is not None else None
        for folder in self.complete():
            if folder.name == tag or (before is not None and step_of(folder.name) > before):
                continue
            problems = verify(folder, self.world)
            if not problems:
                notes.append(f"resuming from {folder.name}, the newest complete checkpoint")
                return folder, notes
            notes.append(f"checkpoint {folder.name} is damaged too: " + "; ".join(problems[:3]))
        raise CheckpointError(f"--resume latest: no complete checkpoint in {self.dir} (" + "; ".join(notes) + ")")


# --------------------------------------------------------------------------- integrity
def _base_optimizer(opt):
    seen = 0
    while opt is not None and not isinstance(opt, torch.optim.Optimizer) and seen < 5:
        opt, seen = getattr(opt, "optimizer", None), seen + 1
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def _bad(t) -> str | None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    if torch.isfinite(t).all():
        return None
    return "NaN" if torch.isnan(t).any() else "inf"


def nonfinite_report(engine, loaded: list[Path]) -> list[str]:
    """Every non-finite parameter or optimizer state of this rank, with the file it was loaded from."""
    optim_files = [p for p in loaded if "optim_states" in p.name]
    model_files = [p for p in loaded if "model_states" in p.name]
    optim_file = (optim_files or model_files or [Path("?")])[-1]
    model_file = (model_files or [Path("?")])[-1]
    out = []
    names = {}
    for name, p in engine.module.named_parameters():
        names[id(p)] = name
        t = getattr(p, "ds_tensor", None)
        kind = _bad(t if t is not None else p.data)
        if kind:
            out.append(f"parameter {name} holds {kind} (loaded from {model_file})")
    base = _base_optimizer(engine.optimizer)
    if base is not None:
        for gi, group in enumerate(base.param_groups):
            for pi, p in enumerate(group["params"]):
                label = names.get(id(p), f"param group {gi} tensor {pi} (fp32 master partition)")
                kind = _bad(p.data)
                if kind:
                    out.append(f"optimizer master weight {label} holds {kind} (loaded from {optim_file})")
                for key, v in base.state.get(p, {}).items():
                    kind = _bad(v)
                    if kind:
                        out.append(f"optimizer state {key!r} of {label} holds {kind} (loaded from {optim_file})")
    return out


def report(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

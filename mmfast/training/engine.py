"""The DeepSpeed training lifecycle, once: the recipes (:mod:`.clip`, :mod:`.llava`, :mod:`.nextgpt`)
say model, data and per-step loss; :class:`Run` does the rest.

    run = Run(args, "train_clip")               # processes, threads, seeds, run folder, DeepSpeed config
    engine = run.initialize(module, optimizer, scheduler)   # deepspeed.initialize + verified resume
    for step, batch in run.steps(loader):       # progress bar, checkpoints every --save-every
        loss = ...; run.backward(loss); run.log(step, {...})
    run.finish(summary, state)                  # checks the weights, writes train_summary.json

Rules every recipe gets from here:

* **Threads**: ``--threads`` per rank, default the machine's cores divided by the ranks on this node.
* **Seeds**: torch's generator is seeded with ``--seed`` on every rank until :meth:`Run.initialize`,
  so every rank builds the same initial weights; then with ``--seed + rank`` for what each rank draws
  while training (dropout, diffusion noise). Python's and numpy's generators get ``--seed + rank``.
  Data order and augmentation do not use these generators (:mod:`.data`).
* **Run folder** (``--out``): a folder that holds anything is refused unless ``--resume`` (continue) or
  ``--overwrite`` (the run's files, checkpoints included, are cleared first). On resume,
  ``metrics.jsonl`` keeps the rows up to the resumed step only.
* **Checkpoints**: :mod:`.checkpoint` (commit protocol, verified resume, weights-only loading,
  integrity check). ``--save-every 0`` saves once, at the end.
* **Faults**: a rank whose ``mmfast train`` is gone (killed, even by SIGKILL) exits within a second
  (:func:`watch_supervisor`); SIGINT/SIGTERM to ``mmfast train`` reach every rank (:mod:`.launch`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from mmfast.training import checkpoint as ck
from mmfast.training.dsconfig import load_config
from mmfast.utils.io import atomic_open, atomic_write_json

SUPERVISOR_ENV = "MMFAST_SUPERVISOR_PID"
LOOPBACK_ENV = "MMFAST_LOOPBACK_STORE"
# What a run writes into --out; --overwrite removes these and nothing else.
RUN_FILES = ("metrics.jsonl", "checkpoints", "final", "train_summary.json", "mm_projector.bin")


# --------------------------------------------------------------------------- arguments
def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def add_common_args(p: argparse.ArgumentParser, *, batch_size: int, ds_config: str | None,
                    steps: int | None, epochs: bool = True, ds_default: str = "") -> None:
    """The options every recipe shares (run folder, DeepSpeed, schedule length, checkpoints, logging)."""
    p.add_argument("--out", required=True, help="run folder (metrics, checkpoints, final export)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds an earlier run (its checkpoints are removed)")
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="ds_config", default=ds_config,
                   help="DeepSpeed JSON, or a preset in mmfast/training/configs (zero0..zero3, zero3_offload)"
                        f"; default {ds_config or ds_default}")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="per-rank micro batch")
    p.add_argument("--steps", type=positive_int, default=steps,
                   help="total optimizer steps" + (" (default: --epochs)" if epochs else ""))
    if epochs:
        p.add_argument("--epochs", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=nonneg_int, default=0, help="data loader processes per rank")
    p.add_argument("--save-every", type=nonneg_int, default=0,
                   help="checkpoint every K steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2,
                   help="complete checkpoints kept (older ones are removed)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (RUN/checkpoints/stepN)")
    p.add_argument("--log-every", type=positive_int, default=1)
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per rank (default: cores / ranks)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)


def run_folder_problem(out: Path, resume: str | None, overwrite: bool) -> str | None:
    """Why ``--out`` cannot be used as given (None: it can)."""
    if resume and overwrite:
        return "--resume and --overwrite contradict each other"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file"
    if out.is_dir() and any(out.iterdir()) and not resume and not overwrite:
        return (f"--out {out} already holds files (an earlier run?); pass --resume latest to continue it, "
                "--overwrite to start afresh, or another --out")
    return None


def clear_run_folder(out: Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def entry(main):
    """A recipe's ``main``: errors that name their cause (a refused checkpoint, a bad config, a
    missing file) end the rank with one line and exit code 2 instead of a traceback."""
    import functools

    from mmfast.training.dsconfig import ConfigError

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except (ck.CheckpointError, ConfigError, FileNotFoundError) as e:
            print(f"{main.__module__} rank {os.environ.get('RANK', '0')}: {e}", file=sys.stderr, flush=True)
            return 2
        finally:
            _leave_process_group()

    return wrapper


def _leave_process_group() -> None:
    """Destroy the process group while the interpreter still runs. Left to static destructors at exit,
    gloo's threads can end a rank that finished its work with "terminate called without an active
    exception" (SIGABRT), which the launcher reports as a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a launched rank (``python -m mmfast.training.X``) with ``code`` once :func:`entry` has returned: flush,
    then ``os._exit``, skipping the interpreter's finalization. Even after the process group is destroyed, the
    static destructors of gloo's threads at finalization now and then end a rank that finished its work with
    "terminate called without an active exception" (SIGABRT; 2 of 3 full test runs on a 2-core AMD machine, in
    different multi-rank tests). Everything a rank writes is closed by then (atomic writes, ``with`` blocks)."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


# --------------------------------------------------------------------------- processes
def _start_time(pid: int) -> str | None:
    """The start time of live process ``pid`` (None once it is gone, or dead and not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def watch_supervisor(pid: int, poll_s: float = 0.5) -> threading.Thread | None:
    """Exit this process once ``pid`` (the ``mmfast train`` that started the launcher) is gone.

    The launcher and its ranks live in their own process group so that a signal to ``mmfast train``
    can be forwarded to all of them; nothing forwards SIGKILL, so each rank watches for itself.
    """
    born = _start_time(pid)
    if born is None:
        return None

    def watch():
        while True:
            time.sleep(poll_s)
            if _start_time(pid) != born:  # gone, or the pid was reused by another process
                print(f"rank {os.environ.get('RANK', '?')}: mmfast train (pid {pid}) is gone; exiting",
                      file=sys.stderr, flush=True)
                os._exit(143)

    t = threading.Thread(target=watch, name="mmfast-supervisor-watch", daemon=True)
    t.start()
    return t


_LISTENERS: list = []


def _loopback_store(world: int, rank: int):
    """A rendezvous store listening on 127.0.0.1 only (torch's TCPStore binds every interface)."""
    import datetime
    import socket

    import torch.distributed as dist

    port = int(os.environ["MASTER_PORT"])
    timeout = datetime.timedelta(minutes=30)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world, False, timeout=timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    _LISTENERS.append(sock)  # the store serves on this socket: keep it open for the process's life
    return dist.TCPStore("127.0.0.1", port, world, True, timeout=timeout, master_listen_fd=sock.fileno())


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group (NCCL on CUDA, gloo on the CPU accelerator); (rank, world, device)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from mmfast.distributed.deepspeed_shm import release_shm_buffer

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if os.environ.get(SUPERVISOR_ENV):
        watch_supervisor(int(os.environ[SUPERVISOR_ENV]))
    acc = get_accelerator()
    backend = acc.communication_backend_name()  # nccl on CUDA, gloo on the CPU accelerator
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get(LOOPBACK_ENV) == "1" and not dist.is_initialized():
        dist.init_process_group(backend, store=_loopback_store(world, rank), rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if acc.device_name() == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        dist.barrier()  # every rank has mapped every peer's shm allreduce buffer: the names can go
        release_shm_buffer(rank)
        device = torch.device("cpu")
    return rank, world, device


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- the run
class Run:
    """One rank's view of a training run (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, name: str):
        import torch.distributed as dist

        self.args, self.name = args, name
        self.out = Path(args.out)
        self.rank, self.world, self.device = init_distributed()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local))
        random.seed(args.seed + self.rank)
        np.random.seed(args.seed + self.rank)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        # Rank 0 owns the run folder (the others may see it change on a shared filesystem).
        problem = run_folder_problem(self.out, args.resume, args.overwrite) if self.rank == 0 else None
        problem = _broadcast(problem)
        if problem:
            raise SystemExit(f"{name}: {problem}")
        if self.rank == 0:
            if args.overwrite:
                clear_run_folder(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.ds_config = load_config(args.ds_config, args.batch_size, self.world,
                                     on_gpu=self.device.type == "cuda")
        self.checkpoints = ck.Checkpointer(self.out, self.rank, self.world, args.keep_checkpoints,
                                           dist.barrier, _gather)
        self.metrics_path = self.out / "metrics.jsonl"
        self.engine = None
        self.start = 0
        self.total = None
        self.resumed_from = None
        self.exclude_frozen = False
        self._bar = None
        self._count = 0
        self._t_start = self._t_last = time.perf_counter()

    # ------------------------------------------------------------------ set-up
    def initialize(self, module, optimizer, scheduler, exclude_frozen: bool = False):
        """``deepspeed.initialize``, then, with ``--resume``, the verified checkpoint, RNG and checks."""
        import deepspeed

        self.exclude_frozen = exclude_frozen
        engine, _, _, self.scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                            lr_scheduler=scheduler, config=self.ds_config)
        self.engine = engine
        self._loaded = ck.install_safe_loader(engine)
        torch.manual_seed(self.args.seed + self.rank)
        if self.args.resume:
            self.start = self._resume()
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        return engine

    def _resume(self) -> int:
        try:
            folder, notes = self.checkpoints.resolve(self.args.resume) if self.rank == 0 else (None, [])
            result = (str(folder), notes, None)
        except ck.CheckpointError as e:
            result = (None, [], str(e))
        folder, notes, error = _broadcast(result if self.rank == 0 else None)
        for note in notes if self.rank == 0 else []:
            ck.report(f"{self.name}: {note}")
        if error:
            raise ck.CheckpointError(error)
        folder = Path(folder)
        try:
            _, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                    load_module_strict=not self.exclude_frozen)
        except ck.CheckpointError:
            raise
        except Exception as e:  # DeepSpeed's own errors name no file: say which checkpoint
            raise ck.CheckpointError(f"{folder}: DeepSpeed could not load it ({type(e).__name__}: {e})") from e
        if client is None or "step" not in client:
            raise ck.CheckpointError(f"{folder}: no step recorded in the checkpoint")
        ck.set_rng_state(ck.safe_load(folder / f"rng_rank{self.rank}.pt"))
        bad = [f"rank {r}: {m}" for r, msgs in enumerate(_gather(ck.nonfinite_report(self.engine, self._loaded)))
               for m in msgs]
        if bad:
            raise ck.CheckpointError(f"{folder}: non-finite values after loading: " + "; ".join(bad[:8]))
        start = int(client["step"])
        self.resumed_from = str(folder)
        if self.rank == 0:
            self._truncate_metrics(start)
            ck.report(f"{self.name}: resumed from {folder} at step {start}")
        return start

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a row cut short by a crash: nothing after it is trusted
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(line)
        with atomic_open(self.metrics_path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ the loop
    def steps(self, loader, total: int, desc: str, banner: str = ""):
        """Yield ``(step, batch)`` (step counts from 1, resumed runs from the resumed step + 1); after
        each step, update the bar and save a checkpoint every ``--save-every`` steps and at the end."""
        self.total = total
        if self.rank == 0:
            print(f"{self.name}: {banner}, ZeRO-{self.engine.zero_optimization_stage()}, {self.dtype}, "
                  f"{self.device} x{self.world}, steps {self.start}->{total}", flush=True)
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=self.start, desc=desc, dynamic_ncols=True, mininterval=1.0)
        self._t_start = self._t_last = time.perf_counter()
        self._count = 0
        self.engine.train()
        step = self.start
        for batch in loader:
            step += 1
            yield step, batch
            if self._bar is not None:
                self._bar.update(1)
            every = self.args.save_every
            if step == total or (every and step % every == 0):
                self.checkpoints.save(self.engine, step, self.exclude_frozen)
        self.step = step
        if self._bar is not None:
            self._bar.close()
        self.train_seconds = time.perf_counter() - self._t_start

    def backward(self, loss, samples: int = 0) -> None:
        """Backward and optimizer step; ``samples`` (samples or tokens this step, all ranks) feeds the
        rate column of the next :meth:`log` row."""
        self._count += samples
        self.engine.backward(loss)
        self.engine.step()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{float(loss.detach()):.4f}")

    def should_log(self, step: int) -> bool:
        return step % self.args.log_every == 0 or step == self.total

    def log(self, step: int, row: dict, rate: str | None = None) -> None:
        """Rank 0 appends ``{"step": step, **row, rate, memory_mb, time}`` to metrics.jsonl; ``rate``
        names the column for what :meth:`backward` counted since the previous row, per second."""
        now = time.perf_counter()
        dt, count = max(now - self._t_last, 1e-9), self._count
        self._t_last, self._count = now, 0
        if self.rank == 0:
            full = {"step": step, **row, **({rate: round(count / dt, 1)} if rate else {}),
                    "memory_mb": round(peak_memory_mb(self.device), 1), "time": round(now - self._t_start, 3)}
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(full) + "\n")

    # ------------------------------------------------------------------ the end
    def gather_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full fp32 weights on every rank from any ZeRO stage (a collective: every rank calls it):
        trainable parameters from DeepSpeed's fp32 masters, frozen ones gathered, then the buffers."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        zero3 = self.engine.zero_optimization_stage() == 3
        state = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # a collective under ZeRO
            if full is None:
                if zero3 and hasattr(p, "ds_id"):
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                        full = p.detach().float().cpu().clone()
                else:
                    full = p.detach()
            state[name] = full.detach().float().cpu().clone()
        params = set(state)
        for name, buf in module.state_dict().items():
            if name not in params and buf.numel():
                state[name] = buf.detach().cpu().clone()
        return state

    def export(self, write, folder: str = "final") -> Path:
        """Rank 0: ``write(tmp_dir)`` into a fresh folder, then swap it in as ``OUT/folder``."""
        final = self.out / folder
        if self.rank == 0:
            tmp = self.out / f".{folder}.incoming"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            old = self.out / f".{folder}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        return final

    def finish(self, summary: dict, state: dict[str, torch.Tensor] | None = None) -> int:
        """Check the final weights (finite, the same on every rank), then write train_summary.json."""
        import importlib.metadata as md

        import torch.distributed as dist

        sums = None
        if state is not None:
            bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise RuntimeError(f"{self.name}: the trained weights hold NaN/inf in {bad[:8]}; nothing exported")
            sums = _gather(float(sum(t.double().sum() * (i + 1) for i, t in enumerate(state.values()))))
            if len(set(sums)) != 1:
                raise RuntimeError(f"{self.name}: ranks ended with different weights (checksums {sums})")
        if self.rank == 0:
            try:
                version = md.version("mmfast")
            except md.PackageNotFoundError:
                version = None
            import mmfast

            atomic_write_json(self.out / "train_summary.json", {
                **summary, "world_size": self.world, "zero_stage": self.engine.zero_optimization_stage(),
                "steps": self.step, "train_seconds": round(self.train_seconds, 3), "device": str(self.device),
                "dtype": str(self.dtype), "resumed_from": self.resumed_from, "param_checksums": sums,
                "mmfast_version": version, "mmfast_package": str(Path(mmfast.__file__).parent)})
        dist.barrier()
        return 0

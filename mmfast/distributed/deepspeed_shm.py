"""DeepSpeed's CPU shared-memory allreduce leaves one ~66 MiB file per rank in ``/dev/shm``.

On the CPU accelerator, when every rank is local, ``deepspeed.init_distributed`` creates
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` and maps the files of
the other ranks, but never unlinks its own. Every CPU run therefore leaked 2 × 66 MiB: 136 test and
demo runs had filled 18 GiB of RAM-backed ``/dev/shm`` on a 24 GiB machine. Once all ranks have
mapped each other's buffer (a barrier after initialisation), the names can go: the mappings stay valid
until the processes exit, and a killed run leaves nothing behind.
"""
from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def buffer_path(rank: int, shm_dir: Path = SHM_DIR, env=None) -> Path:
    """The file DeepSpeed's shm op creates for ``rank`` (its naming: uid, master address, port, rank)."""
    env = os.environ if env is None else env
    return Path(shm_dir) / f"{PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def release_shm_buffer(rank: int, shm_dir: Path = SHM_DIR, env=None) -> bool:
    """Unlink this rank's buffer name; True if there was one. Call after a barrier that follows
    ``deepspeed.init_distributed`` (every peer has opened it by then)."""
    try:
        buffer_path(rank, shm_dir, env).unlink()
    except FileNotFoundError:
        return False
    return True


__all__ = ["buffer_path", "release_shm_buffer"]

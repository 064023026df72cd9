"""A free TCP port for a rendezvous on this machine, chosen where no other process is handed it by chance.

Binding to port 0 asks the kernel for a port from its *ephemeral* range, the same range it draws from for
the local end of every outgoing connection. Between the probe and the moment the rendezvous binds it (a
launcher start, a Python import: seconds), the kernel may give that port to any process's outgoing
connection, and the bind fails with "Address already in use". That happened under parallel tests, where
gloo ranks open many loopback connections. A port below the ephemeral range is only ever taken by a process
that binds it by number, so probing one there leaves only a collision between two such pickers.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 12000  # ports tried: the span just below the ephemeral range


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux: ``ip_local_port_range``; elsewhere IANA's 49152-65535)."""
    try:
        lo, hi = (int(v) for v in _RANGE_FILE.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A port that ``host`` can bind now, below the ephemeral range (see the module docstring); the
    kernel's own choice only if every try in that span was taken."""
    lo, _ = ephemeral_range()
    first = max(1024, lo - _SPAN)
    rng = random.SystemRandom()
    for _ in range(tries if lo - 1 >= first else 0):
        port = rng.randint(first, lo - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = ["ephemeral_range", "free_port"]

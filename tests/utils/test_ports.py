"""mmfast.utils.ports: rendezvous ports come from below the kernel's ephemeral range (where no outgoing
connection is handed them between the probe and the bind), and are free when returned."""
import socket

from mmfast.training import launch
from mmfast.utils import ports


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    lo, hi = ports.ephemeral_range()
    assert 1024 <= lo <= hi <= 65535
    seen = set()
    for _ in range(20):
        port = ports.free_port()
        assert 1024 <= port < lo, (port, lo)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when returned
        seen.add(port)
    assert len(seen) > 1  # drawn at random, not one fixed port two launches would share
    assert launch.free_port() < lo  # what `mmfast train` hands the launcher


def test_a_taken_port_is_skipped(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen(1)
        picks = iter([taken, taken, taken + 1 if taken < 65535 else taken - 1])
        monkeypatch.setattr(ports.random.SystemRandom, "randint", lambda self, a, b: next(picks))
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (65536, 65536))  # any pick is "below" it
        assert ports.free_port() != taken


def test_range_file_missing_falls_back_to_iana(monkeypatch, tmp_path):
    monkeypatch.setattr(ports, "_RANGE_FILE", tmp_path / "absent")
    assert ports.ephemeral_range() == (49152, 65535)

"""Loopback ports for tests that run in parallel (pytest -n 4): no pick-then-bind races.

Picking a port by binding port 0 and closing the socket leaves a gap before the server
binds it, in which another test process can take it. So, per kind of need:

- a server that can bind port 0 itself does (nats-server `-p -1`, `hub serve --web
  127.0.0.1:0`) and the test reads the real port back from its log: nothing here;
- a server that must be told its port up front is started with `start_on_free_port`,
  which retries on a fresh port when the server reports "address already in use";
- a port that must refuse connections is `closed_port()`: a socket bound to it and never
  listening, held for the whole `with` block, so connects are refused and nobody can
  bind it meanwhile;
- a run of consecutive ports fixed in configuration files (`hub init --cluster`) is
  `reserve_port_run`: ports below the kernel's ephemeral range (where port-0 binds and
  outgoing connections never land), each locked across processes with a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Lock files of reserved ports, shared by every test process of this user on the machine.
LOCK_DIR = Path(tempfile.gettempdir()) / f"fleetledger-ports-{os.getuid()}"
_held: list[int] = []  # lock file descriptors: reservations last as long as this process


class PortInUse(RuntimeError):
    """The server could not bind its port: another process holds it."""


def address_in_use(text: str) -> bool:
    """`text` (a server's log or error output) says its port was taken."""
    return "address already in use" in text.lower()


def pick_port() -> int:
    """A loopback port free at this instant, with no guarantee that it stays free: only
    for `start_on_free_port`, which retries when it was taken in between."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_on_free_port(start: Callable[[int], T], tries: int = 5) -> T:
    """`start(port)` on a picked port; when it raises `PortInUse` (the port was taken
    between the pick and the bind), again on a new port, at most `tries` times."""
    for _ in range(tries - 1):
        with contextlib.suppress(PortInUse):
            return start(pick_port())
    return start(pick_port())


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where connections are refused, for as long as the block runs: a
    socket is bound to it but never listens, so no other process can bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def reserve_port_run(count: int, tries: int = 200) -> int:
    """The first of `count` consecutive loopback ports, reserved for this process's
    lifetime: below the ephemeral range, free now, and locked (one lock file per port)
    against every other process that reserves ports through here."""
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    high = min(_ephemeral_low(), 65536) - count
    for _ in range(tries):
        base = random.randrange(10_000, high)
        locks: list[int] = []
        try:
            for port in range(base, base + count):
                fd = os.open(LOCK_DIR / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                locks.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: reserved elsewhere
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))  # OSError: in use by something else
        except OSError:
            for fd in locks:
                os.close(fd)
            continue
        _held.extend(locks)
        return base
    raise RuntimeError(f"no run of {count} free ports found below {high + count}")

"""testkit/ports.py under a real race: another process takes the port a test picked
before its server binds it (what a parallel xdist worker can do), and the helpers still
give every server a port of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import ports
from testkit.nats_server import EmbeddedNats, NatsServerError
from tests.fleet import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

# Another process that binds and listens on the port argv[1] until its stdin closes.
HOLD = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
    print("listening", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def thief() -> Iterator[list[int]]:
    """Patches `pick_port` so that another process takes the first picked port right after
    the pick; yields the ports it took."""
    taken: list[int] = []
    holders: list[subprocess.Popen[bytes]] = []
    real_pick = ports.pick_port

    def pick_then_steal() -> int:
        port = real_pick()
        if not taken:
            holder = subprocess.Popen([sys.executable, "-c", HOLD, str(port)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            holders.append(holder)
            assert holder.stdout is not None and holder.stdout.readline() == b"listening\n"
            taken.append(port)
        return port

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ports, "pick_port", pick_then_steal)
        yield taken
    for holder in holders:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


def nats_on(root: Path, port: int) -> EmbeddedNats:
    """A nats-server told its port up front; `PortInUse` when it could not bind it."""
    try:
        return EmbeddedNats(store_dir=root / f"nats-{port}", port=port).start()
    except NatsServerError as exc:
        if ports.address_in_use(str(exc)):
            raise ports.PortInUse(str(exc)) from exc
        raise


@pytest.mark.nats
def test_a_port_taken_between_pick_and_bind_fails_without_retry(
        tmp_path: Path, thief: list[int]) -> None:
    """The race is real: with one try, the server finds its picked port taken."""
    with pytest.raises(ports.PortInUse):
        ports.start_on_free_port(lambda port: nats_on(tmp_path, port), tries=1)
    assert len(thief) == 1


@pytest.mark.nats
def test_start_on_free_port_starts_the_server_on_another_port(
        tmp_path: Path, thief: list[int]) -> None:
    server = ports.start_on_free_port(lambda port: nats_on(tmp_path, port))
    try:
        assert len(thief) == 1 and server.port != thief[0]
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            assert conn.recv(4096).startswith(b"INFO ")  # nats-server, not the thief
    finally:
        server.close()


def test_a_closed_port_refuses_connections_and_cannot_be_taken() -> None:
    with ports.closed_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        other = subprocess.run([sys.executable, "-c", HOLD, str(port)], input=b"",
                               capture_output=True, timeout=30, check=False)
        assert other.returncode != 0 and b"Address already in use" in other.stderr


def test_reserved_port_runs_do_not_overlap_across_processes() -> None:
    """Another process that tries the very same run first is turned away by the locks."""
    base = ports.reserve_port_run(3)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert base + 3 <= low  # never where port-0 binds and outgoing connections land
    other = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import random
        from testkit import ports
        first = iter([{base}, {base + 2}])
        real = random.randrange
        random.randrange = lambda a, b: next(first, None) or real(a, b)
        print(ports.reserve_port_run(3))
    """)], capture_output=True, text=True, timeout=30, check=False, cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert other.returncode == 0, other.stderr
    theirs = int(other.stdout)
    assert not set(range(theirs, theirs + 3)) & set(range(base, base + 3)), (base, theirs)

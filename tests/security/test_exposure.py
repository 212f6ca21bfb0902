"""Class 9 of issue 12 (the configuration part): the nats-server.conf `hub init` writes
listens only where `--nats` points and keeps JetStream under the hub's home."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hub.home.config import HomeError, HubConfig, init_home
from hub.home.nats_config import jetstream_dir, listen_address, server_conf_path
from testkit.nats_server import find_nats_server
from testkit.ports import PortInUse, address_in_use, start_on_free_port

pytestmark = pytest.mark.timeout(30)


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (None: there is none)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: sends nothing, picks the route's source
        address = str(s.getsockname()[0])
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("url", "listen"), [
    ("nats://127.0.0.1:4222", "127.0.0.1:4222"),
    ("nats://localhost:7422", "localhost:7422"),
    ("tls://10.1.2.3:4443", "10.1.2.3:4443"),
    ("nats://[::1]:4222", "[::1]:4222"),
    ("nats://user:pw@127.0.0.1", "127.0.0.1:4222"),
    ("127.0.0.1:5000", "127.0.0.1:5000"),
    ("nats://127.0.0.1:4222,nats://127.0.0.1:4223", "127.0.0.1:4222"),
])
def test_the_listen_address_comes_from_the_nats_url(url: str, listen: str) -> None:
    assert listen_address(url) == listen


def test_hub_init_refuses_a_nats_url_it_cannot_listen_on(tmp_path: Path) -> None:
    with pytest.raises(HomeError):
        init_home(tmp_path / "hub", "nats://127.0.0.1:notaport")
    assert not (tmp_path / "hub").exists()


def serve_written_config(tmp_path: Path, port: int) -> tuple[
        HubConfig, subprocess.Popen[bytes], str]:
    """`hub init --nats nats://127.0.0.1:PORT`, then a nats-server run with nothing but
    the file it wrote, until ready: the config, the server and its log. `PortInUse` when
    a parallel test took the port first (`start_on_free_port` then tries another)."""
    config = init_home(tmp_path / f"hub-{port}", f"nats://127.0.0.1:{port}")
    log_path = tmp_path / f"nats-{port}.log"
    proc = subprocess.Popen([find_nats_server(), "-c", str(server_conf_path(config.home)),
                             "-l", str(log_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while "Server is ready" not in (log := log_path.read_text() if log_path.exists() else ""):
        if proc.poll() is not None and address_in_use(log):
            raise PortInUse(log)
        assert proc.poll() is None, log
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
    return config, proc, log


@pytest.mark.nats  # starts a nats-server (not through EmbeddedNats: with the file alone)
def test_the_written_config_listens_only_where_nats_says(tmp_path: Path) -> None:
    # The port is written into the config before the server binds it: retried on a clash.
    config, proc, log = start_on_free_port(lambda port: serve_written_config(tmp_path, port))
    port = int(listen_address(config.nats_url).rsplit(":", 1)[1])
    store = jetstream_dir(config.home).resolve()  # the server adds jetstream/ itself
    try:
        conf = server_conf_path(config.home)
        text = conf.read_text()
        assert re.search(rf'^listen: "127\.0\.0\.1:{port}"$', text, re.M), text
        assert f'jetstream {{ store_dir: "{store.parent}" }}' in text, text
        assert "/tmp/nats" not in text

        # The server run with nothing but that file: bound to loopback, store in the home.
        assert f"Listening for client connections on 127.0.0.1:{port}" in log, log
        assert f'Store Directory: "{store}"' in log, log
        assert reachable("127.0.0.1", port)
        other = non_loopback_address()
        if other is not None:
            assert not reachable(other, port), f"reachable on {other}:{port}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    assert store.is_dir()

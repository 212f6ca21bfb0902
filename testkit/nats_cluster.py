"""Run nats-server processes from configuration files `hub init --cluster` and
`hub site add` wrote (a cluster's nodes, an edge site's leaf node), for tests.

Each server gets its configuration as it is (ports, store dir, routes, leaf remotes)
and a log file of its own; it is stopped or killed by the PID we started, nothing else.
`free_port_run` reserves consecutive free loopback ports, as `hub init --cluster` numbers
the nodes' ports up from the first.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats

from testkit.nats_server import NatsServerError, find_nats_server, kill_process, stop_process
from testkit.ports import reserve_port_run


def free_port_run(count: int, tries: int = 200) -> int:
    """The first of `count` consecutive loopback ports, reserved across test processes
    (testkit/ports.py): free now and not handed to anyone else while this process runs."""
    return reserve_port_run(count, tries)


@dataclass
class ConfiguredNats:
    """One nats-server started with `-c config_file`, logging to `log_path`."""

    config_file: Path
    log_path: Path
    startup_timeout: float = 20.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ConfiguredNats:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        self.process = subprocess.Popen(
            [find_nats_server(), "-c", str(self.config_file), "-l", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "Server is ready" in text:
                return self
            if self.process.poll() is not None:
                raise NatsServerError(f"nats-server {self.config_file.name} exited with code "
                                      f"{self.process.returncode}: {text.strip()[-800:]}")
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server {self.config_file.name} not ready within "
                              f"{self.startup_timeout} s")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (then SIGKILL) the server we started; its store stays."""
        stop_process(self.process, timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash of the machine would."""
        kill_process(self.process)
        self.process = None


@dataclass
class NatsCluster:
    """The nodes of a cluster, from HOME/nats/node-*.conf; `url` lists them all."""

    configs: list[Path]
    log_dir: Path
    urls: list[str]
    nodes: list[ConfiguredNats] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.nodes = [ConfiguredNats(conf, self.log_dir / f"{conf.stem}.log")
                      for conf in self.configs]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def start(self) -> NatsCluster:
        # All at once: a node's JetStream waits for its peers before it says it is ready.
        procs = [threaded_start(node) for node in self.nodes]
        for wait in procs:
            wait()
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def threaded_start(server: ConfiguredNats) -> Callable[[], None]:
    """Start `server` in a thread; the returned function waits for it (re-raising)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if errors:
            raise errors[0]

    return wait


async def wait_jetstream(url: str, timeout: float = 30.0, **options: object) -> None:
    """Until JetStream answers through `url` (a cluster has elected its meta leader)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(url.split(","), connect_timeout=2,
                                    max_reconnect_attempts=1, **options)
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.2)
            continue
        try:
            await nc.jetstream().account_info()
            return
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.2)
        finally:
            await nc.close()
    raise NatsServerError(f"JetStream not available at {url} within {timeout} s: {last}")

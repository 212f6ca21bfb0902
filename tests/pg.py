"""A throwaway PostgreSQL server for tests: initdb into a temp dir, run, remove.

The server runs as the `postgres` user when the tests run as root (PostgreSQL refuses
to run as root), trusts local connections, and runs with fsync off: it is thrown away
at the end of the session, so durability is not what is under test here.

`PgServer.start()` raises `PgUnavailable` when no PostgreSQL server binaries are
installed; the pytest fixtures in tests/conftest.py turn that into a clear failure
(or a skip with `FLEET_ALLOW_NO_PG=1`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from testkit.ports import address_in_use, pick_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
PG_USER = "postgres"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres) were not found under "
    f"{PG_BIN_GLOB} or on PATH; install the `postgresql` package "
    "(Debian/Ubuntu: apt-get install -y postgresql), or set FLEET_ALLOW_NO_PG=1 "
    "to skip the PostgreSQL tests on this machine"
)


class PgUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); "9.6" -> (9, 6); highest version wins.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def find_pg_bin() -> Path:
    """The directory holding `initdb` and `postgres`, highest installed version first."""
    candidates = sorted(
        (p for p in Path("/").glob(PG_BIN_GLOB.lstrip("/")) if (p / "initdb").is_file()),
        key=_version_key,
        reverse=True,
    )
    if candidates:
        return candidates[0]
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").is_file():
        return Path(initdb).parent
    raise PgUnavailable(INSTALL_HINT)


class PgServer:
    """One private PostgreSQL server. `start()`, then `create_database()`, then `stop()`."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bin_dir = find_pg_bin()
        self.durable = durable  # False: fsync off (-F), fine for tests, not for benchmarks
        self.port = 0
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count()
        # PostgreSQL refuses to run as root; then it runs as the `postgres` user.
        self._as_user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._as_user = pwd.getpwnam(PG_USER)
            except KeyError as exc:
                raise PgUnavailable(
                    f"running as root but there is no {PG_USER!r} user to run PostgreSQL "
                    "as (the `postgresql` package creates it)"
                ) from exc

    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise RuntimeError("the server is not started")
        return self._base

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` on this server."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A raw psycopg connection as the superuser, in autocommit mode."""
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname=database,
            autocommit=True, connect_timeout=5,
        )  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> PgServer:
        # Not pytest's tmp dirs: those are 0700 under root's, out of the postgres user's reach.
        # Short path: the Unix socket lives here too (paths are limited to ~107 bytes).
        self._base = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        try:
            if self._as_user is not None:
                os.chown(self._base, self._as_user.pw_uid, self._as_user.pw_gid)
            self._initdb()
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        cmd = [
            str(self.bin_dir / "initdb"), "-D", str(self.base_dir / "data"), "-A", "trust",
            "-U", PG_USER, "--no-sync", "-E", "UTF8", "--locale=C",
        ]  # fmt: skip
        if self._as_user is not None:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, check=False, cwd=self.base_dir
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()}")

    def _launch(self) -> None:
        # The port is chosen before the server binds it (PostgreSQL cannot bind port 0
        # and report it); when another process took it in between, try another.
        for _attempt in range(5):
            self.port = pick_port()
            log = self.base_dir / f"postgres-{self.port}.log"
            with open(log, "wb") as log_file:
                # Popen(user=...) rather than runuser: the PID we hold is the postmaster's
                # own, so the shutdown signal reaches it directly.
                self._proc = subprocess.Popen(
                    self._server_command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=self.base_dir,
                    user=self._as_user.pw_uid if self._as_user else None,
                    group=self._as_user.pw_gid if self._as_user else None,
                    extra_groups=[] if self._as_user else None,
                )
            if self._wait_ready(log):
                return
            self._proc = None
        raise RuntimeError(f"PostgreSQL did not start; see {self.base_dir}/postgres-*.log")

    def _server_command(self) -> list[str]:
        return [
            str(self.bin_dir / "postgres"), "-D", str(self.base_dir / "data"),
            "-k", str(self.base_dir), "-h", "127.0.0.1", "-p", str(self.port),
            "-c", "max_connections=60", "-c", "shared_buffers=32MB",
            *([] if self.durable else ["-F"]),
        ]  # fmt: skip

    def _wait_ready(self, log: Path) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                text = log.read_text(errors="replace")
                if "could not bind" in text or address_in_use(text):
                    return False  # port clash: the caller retries on another port
                raise RuntimeError(f"PostgreSQL exited at start-up:\n{text[-2000:]}")
            try:
                with self.connect():
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        self._terminate()
        raise RuntimeError(
            f"PostgreSQL did not accept connections within {START_TIMEOUT_S:.0f} s:\n"
            + log.read_text(errors="replace")[-2000:]
        )

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database (a copy of template1: cheap); returns its URL."""
        name = name or f"t{next(self._names)}_{os.getpid()}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # "fast" shutdown: abort sessions, clean stop
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Stop the server we started (by its PID) and remove its directory."""
        try:
            self._terminate()
        finally:
            if self._base is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(self._base)
                self._base = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

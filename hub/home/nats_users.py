"""The NATS users file follows the ledger: every enrolled, unrevoked device and every
unrevoked operator key is a NATS user (its nkey is its Ed25519 key; hub.home.nats_config
writes the file and reloads the local server)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
from collections.abc import Iterator

from sqlalchemy import Connection, Engine, select

from hub.devices import state as device_state
from hub.devices.state import REVOKED
from hub.governance import state as governance
from hub.home.config import HubConfig
from hub.home.nats_check import confirm_reload
from hub.home.nats_config import (
    ca_path,
    load_credentials,
    probe_seed,
    reload_server,
    server_conf_path,
    write_users,
)

log = logging.getLogger(__name__)

USERS_LOCK = "users.lock"  # beside users.conf: held while it is written and reloaded


def nats_users(conn: Connection) -> list[tuple[str, bytes]]:
    """(device, public key) of every enrolled, unrevoked device with a key: its NATS users."""
    rows = conn.execute(select(device_state.DEVICES.c.device, device_state.DEVICES.c.public,
                               device_state.DEVICES.c.state)).all()
    return [(d, p) for d, p, state in rows if isinstance(p, bytes) and state != REVOKED]


def nats_operators(conn: Connection) -> list[tuple[str, bytes]]:
    """(key id, public key) of every unrevoked operator key: its NATS users."""
    return [(op["keyid"], op["public"]) for op in governance.list_operators(conn)
            if not op["revoked"] and isinstance(op["public"], bytes)]


def identity_holder(conn: Connection, public: bytes) -> str | None:
    """Who already holds `public` as their key (and so NATS identity): "device ID" or
    "operator NAME" (revoked ones too: a key is never handed to a second identity), or
    None. Two users with one nkey make nats-server refuse the whole users file."""
    # Asked by the database, not by reading every device: one enrolment of 10,000 read
    # them all (O(n) per enrolment, O(n^2) for a fleet; 12 s of 2,000 enrolments).
    device = conn.execute(select(device_state.DEVICES.c.device)
                          .where(device_state.DEVICES.c.public == public).limit(1)).scalar()
    if device is not None:
        return f"device {device}"
    for op in governance.list_operators(conn):
        if op["public"] == public:
            return f"operator {op['name']}"
    return None


def apply_nats_users(config: HubConfig, devices: list[tuple[str, bytes]],
                     operators: list[tuple[str, bytes]], force: bool = False) -> bool:
    """Rewrite the NATS users file for these devices and operators and have the local
    server reload it; True if it reloaded, or if the file was already so and `force` is
    off (the hub forces the first sync after it starts: a hub stopped between writing
    the file and the reload must not leave the server on the old users). A home without
    NATS identities (`hub init --no-auth`) has nothing to rewrite.

    Raises NatsUsersRefused (hub.home.nats_check) if nats-server refuses the new file
    (it is not written), NatsReloadUnconfirmed if the server did not take it."""
    if not load_credentials(config.home):
        return False
    # One writer at a time, across processes: two hub processes on one home (a leader and
    # a standby) both sync; without the lock one's file could replace the other's between
    # its write and its reload, and the first one's reload probe would never get in.
    with _users_lock(config):
        if not write_users(config.home, devices, operators) and not force:
            return True
        if not reload_server(config.home):
            return False
        seed = probe_seed(config.home)
        if seed is not None:  # a users file written before reload probes has none
            confirm_reload(config.nats_url, seed, ca_path(config.home))
        return True


@contextlib.contextmanager
def _users_lock(config: HubConfig) -> Iterator[None]:
    """An exclusive lock on the home's NATS users (released when the file closes, also
    if the process dies)."""
    with open(server_conf_path(config.home).parent / USERS_LOCK, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


class NatsUsersSync:
    """Rewrites the NATS users file from the device and operator tables, coalescing
    requests: a burst of enrolments (the hub serves operator requests concurrently)
    costs one file write and one server reload, not one per device. A caller of
    `sync()` returns once a write that began after its call has finished and its reload
    has settled; `request()` only schedules one."""

    def __init__(self, config: HubConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self._waiting: list[asyncio.Future[bool]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._synced = False  # the first sync reloads the server even if nothing changed

    def request(self) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume_exception)
        self._waiting.append(future)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="nats-users")
        return future

    async def sync(self) -> bool:
        return await self.request()

    async def _run(self) -> None:
        while self._waiting:
            await self._wake.wait()
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            try:
                with self.engine.connect() as conn:
                    users, operators = nats_users(conn), nats_operators(conn)
                reloaded = await asyncio.to_thread(apply_nats_users, self.config, users,
                                                   operators, not self._synced)
                self._synced = True
            except Exception as exc:  # handed to every caller; the next sync tries again
                for future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for future in waiting:
                if not future.done():
                    future.set_result(reloaded)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _consume_exception(future: asyncio.Future[bool]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("NATS users file not updated: %s", future.exception())

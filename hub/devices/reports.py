"""Device identity: the key made at enrolment, the device bundle, signed-report checks.

`hub device enroll ID` makes an Ed25519 key for the device, records its public half in
the `device.enrolled` event (`public`), and writes the bundle the device is set up from:

    HOME/devices/ID/device.toml     device_id, nats_url, file names (see BUNDLE_FIELDS)
    HOME/devices/ID/device.key      the device's private key (0600)
    HOME/devices/ID/trust-root.bin  the newest trust root, pinned by the device
    HOME/devices/ID/ca.pem          the NATS server's CA certificate (homes made with --tls)

The device key is also the device's NATS identity (an nkey; edge_agent/nats_auth.py):
enrolment adds the device's user to the NATS server's users file, revocation removes it
(`nats_users`, hub/nats_config.py).

`edge-agent run --bundle DIR` reads it (edge_agent/bundle.py). The format is a flat TOML
table; readers ignore keys they do not know, so more files (NATS credentials) can be
added later. A device that keeps its key elsewhere (a secure element) enrolls with
`--public HEX` and gets a bundle without device.key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select

from edge_agent.bundle import (
    BUNDLE_FORMAT,
    CA_NAME,
    DEVICE_KEY_NAME,
    DEVICE_TOML,
    TRUST_ROOT_NAME,
)
from edge_agent.protocol import (
    ProtocolError,
    SignedEnvelope,
    check_device_id,
    read_report,
    report_signed_by,
)
from hub import events as ev
from hub import fold as proj
from hub.home.config import HubConfig
from hub.home.nats_config import ca_path, load_credentials, reload_server, write_users
from ledger.entry import Entry
from ledger.signing import SigningKey
from ledger.storage.schema import ENTRIES
from ledger.storage.store import LedgerStore

REVOKED = "revoked"  # proj_devices.state of a revoked device
log = logging.getLogger(__name__)


def bundle_dir(config: HubConfig, device: str) -> Path:
    return config.home / "devices" / device


def write_bundle(config: HubConfig, device: str, key: SigningKey | None) -> Path:
    """Write (or replace) the device bundle; returns its directory."""
    directory = bundle_dir(config, device)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if key is not None:
        key.save(directory / DEVICE_KEY_NAME)
        os.chmod(directory / DEVICE_KEY_NAME, 0o600)
    shutil.copyfile(config.trust_root_path, directory / TRUST_ROOT_NAME)
    lines = [
        "# fleetledger device bundle (written by `hub device enroll`)",
        f"format = {BUNDLE_FORMAT}",
        f"device_id = {_toml_str(device)}",
        f"nats_url = {_toml_str(config.nats_url)}",
        f"trust_root = {_toml_str(TRUST_ROOT_NAME)}",
    ]
    if key is not None:
        lines.append(f"device_key = {_toml_str(DEVICE_KEY_NAME)}")
    ca = ca_path(config.home)
    if ca is not None:
        shutil.copyfile(ca, directory / CA_NAME)
        lines.append(f"nats_ca = {_toml_str(CA_NAME)}")
    (directory / DEVICE_TOML).write_text("\n".join(lines) + "\n")
    return directory


def nats_users(conn: Connection) -> list[tuple[str, bytes]]:
    """(device, public key) of every enrolled, unrevoked device with a key: its NATS users."""
    rows = conn.execute(select(proj.DEVICES.c.device, proj.DEVICES.c.public,
                               proj.DEVICES.c.state)).all()
    return [(d, p) for d, p, state in rows if isinstance(p, bytes) and state != REVOKED]


def nats_operators(conn: Connection) -> list[tuple[str, bytes]]:
    """(key id, public key) of every unrevoked operator key: its NATS users."""
    return [(op["keyid"], op["public"]) for op in proj.list_operators(conn)
            if not op["revoked"] and isinstance(op["public"], bytes)]


def apply_nats_users(config: HubConfig, devices: list[tuple[str, bytes]],
                     operators: list[tuple[str, bytes]], force: bool = False) -> bool:
    """Rewrite the NATS users file for these devices and operators and have the local
    server reload it; True if it reloaded, or if the file was already so and `force` is
    off (the hub forces the first sync after it starts: a hub stopped between writing
    the file and the reload must not leave the server on the old users). A home without
    NATS identities (`hub init --no-auth`) has nothing to rewrite."""
    if not load_credentials(config.home):
        return False
    if not write_users(config.home, devices, operators) and not force:
        return True
    return reload_server(config.home)


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


def check_report_signature(device: dict[str, Any], envelope: SignedEnvelope | None) -> None:
    """Refuse (ProtocolError) a status report not signed by the device's enrolled key."""
    name = device["device"]
    if envelope is None:
        raise ProtocolError(f"unsigned status report from {name}: devices must sign status "
                            "reports with their device key (edge-agent run --bundle DIR)")
    public = device.get("public")
    if not isinstance(public, bytes):
        raise ProtocolError(f"status report from {name}, which has no enrolled key")
    if not report_signed_by(envelope, public):
        signers = ", ".join(s.keyid for s in envelope.signatures) or "none"
        raise ProtocolError(f"status report from {name} is not signed by its enrolled key "
                            f"(signed by: {signers})")


def device_history(store: LedgerStore, device: Any) -> dict[str, Any]:
    """Every ledger event about a device, and its enrolled public key, for `hub device
    history` (which checks the report signatures itself)."""
    if not isinstance(device, str):
        raise ProtocolError("missing 'device'")
    check_device_id(device)
    query = (select(ENTRIES.c.body, ENTRIES.c.prev, ENTRIES.c.hash)
             .where(ENTRIES.c.subject == ev.device_subject(device)).order_by(ENTRIES.c.seq))
    with store.engine.connect() as conn:
        row = proj.get_device(conn, device)
        rows = conn.execute(query).all()
    if row is None:
        raise ProtocolError(f"no device {device} is enrolled")
    events = []
    for body, prev, hash_ in rows:
        entry = Entry.from_body(body, prev, hash_)
        events.append({"seq": entry.seq, "ts": entry.ts, "kind": entry.kind,
                       "actor": entry.actor, "payload": entry.payload})
    return {"device": device, "public": row.get("public"), "events": events}


def report_signature(payload: dict[str, Any], public: bytes | None) -> str:
    """'valid', 'INVALID' or 'unsigned' for a device.update_* event's `report`."""
    data = payload.get("report")
    if not isinstance(data, bytes):
        return "unsigned"
    if public is None:
        return "INVALID"
    try:
        report, envelope = read_report(data)
    except ProtocolError:
        return "INVALID"
    if envelope is None or not report_signed_by(envelope, public):
        return "INVALID"
    # The ledger's fields must be the ones the device signed.
    same = all(payload.get(k) == getattr(report, k) for k in
               ("device", "model", "version", "digest", "counter", "boot"))
    return "valid" if same else "INVALID"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

"""How a client proves who it is to the NATS server, and which TLS root it trusts.

Every identity (hub, operator, witness, device) connects with a `NatsAuth`:

- the hub, operators and witnesses: a user name and password (HOME/nats/credentials.toml);
- a device: its Ed25519 device key *is* its NATS nkey. An nkey is an Ed25519 key in
  NATS's own encoding (base32 with a role prefix and a CRC16), so the 32-byte seed in
  the bundle's device.key converts to a user nkey seed (`SU...`) and the public half the
  hub enrolled converts to the public nkey (`U...`) the server's users file lists;
- with TLS on, the CA certificate that signed the server's certificate.

A server reloading its users file (the hub does that at every enrolment) refuses or
resets connections that are half-way through their handshake at that instant; clients
connect with `connect()`, which tries again for a few seconds on exactly those errors.

Devices also use their own reply-inbox prefix, `_INBOX.<device>`: the server lets a
device subscribe only under it, so one device cannot read replies meant for another
(a JetStream API reply can carry another device's assignment).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nkeys
from nats.aio.client import Client as NATS

from ledger.retry import connect_for_good, nats_servers

USER_PREFIX = nkeys.PREFIX_BYTE_USER


def device_inbox_prefix(device_id: str) -> str:
    """The reply-inbox prefix a device must use (its only subscribe permission)."""
    return f"_INBOX.{device_id}"


def nkey_seed(seed: bytes) -> str:
    """The NATS user nkey seed (`SU...`) for a 32-byte Ed25519 seed."""
    return bytes(nkeys.encode_seed(seed, USER_PREFIX)).decode()


def nkey_public(public_raw: bytes) -> str:
    """The NATS user public nkey (`U...`) for a 32-byte Ed25519 public key."""
    if len(public_raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    data = bytes([USER_PREFIX]) + public_raw
    crc = bytes(nkeys.crc16_checksum(data))  # two bytes, little-endian
    return base64.b32encode(data + crc).decode().rstrip("=")


def tls_context(ca_file: Path) -> ssl.SSLContext:
    """A client TLS context that trusts only the hub's CA (hostname checked)."""
    return ssl.create_default_context(cafile=str(ca_file))


@dataclass(frozen=True)
class NatsAuth:
    """Connect options for nats.connect(); the empty value means "no auth, no TLS"."""

    user: str | None = None
    password: str | None = None
    nkey_seed: str | None = None
    ca_file: Path | None = None
    inbox_prefix: str | None = None

    @classmethod
    def for_device(cls, device_id: str, seed: bytes, ca_file: Path | None = None) -> NatsAuth:
        return cls(nkey_seed=nkey_seed(seed), ca_file=ca_file,
                   inbox_prefix=device_inbox_prefix(device_id))

    def options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect()."""
        opts: dict[str, Any] = {}
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.nkey_seed is not None:
            opts["nkeys_seed_str"] = self.nkey_seed
        if self.ca_file is not None:
            opts["tls"] = tls_context(self.ca_file)
        if self.inbox_prefix is not None:
            opts["inbox_prefix"] = self.inbox_prefix
        return opts


NO_AUTH = NatsAuth()


RELOAD_RETRY_SECONDS = 10.0


def _transient(exc: Exception) -> bool:
    """A refusal a server reload can cause: a reset handshake, or the users file being
    swapped while the client authenticated (also: a device enrolled a moment ago)."""
    return isinstance(exc, ConnectionResetError) or "Authorization Violation" in str(exc)


async def connect(url: str, auth: NatsAuth = NO_AUTH,
                  retry_for: float = RELOAD_RETRY_SECONDS, **options: Any) -> NATS:
    """nats.connect() with `auth`, retrying transient refusals for `retry_for` seconds.
    `url` may be a comma-separated list of servers (a cluster): nats-py tries each."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return await nats.connect(nats_servers(url), **options, **auth.options())
        except Exception as exc:
            if not _transient(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def connect_retrying(url: str, auth: NatsAuth = NO_AUTH, *, name: str,
                           log: logging.Logger, stop: asyncio.Event | None = None,
                           give_up_after: float | None = None, cap: float = 5.0,
                           **options: Any) -> NATS:
    """A connection for good, retried quietly (`ledger.retry.connect_for_good`: one log
    line per failed attempt with its reason, exponential backoff up to `cap` seconds,
    `Stopped` when `stop` is set, the last error after `give_up_after` seconds); nats-py
    reconnects for ever afterwards with the same backoff. `url` may list several servers,
    comma-separated: it fails over to the others (and to those the cluster announces)."""
    nc: NATS = await connect_for_good(
        nats.connect, url, log=log, stop=stop, give_up_after=give_up_after, cap=cap,
        name=name, **options, **auth.options())
    return nc

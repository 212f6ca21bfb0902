"""The hub's public, unsigned ledger API over NATS: subjects, messages, and a client.

This is the one ledger module that talks to NATS. The pure core and the store never
import it; only `ledger witness` and `ledger tail --follow --nats` load it (lazily),
because witnesses and auditors read the log from wherever the hub publishes it. The
hub's side is hub/log/api.py. docs/PROTOCOL.md, "Ledger API", is the spec.

Requests and replies are canonical msgpack maps (ledger/encoding.py). Replies are
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": text}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from ledger.encoding import canonical_decode, canonical_encode
from ledger.entry import Entry
from ledger.errors import EncodingError, EntryError, LedgerError
from ledger.merkle import HASHES, TreeHash
from ledger.retry import connect_for_good, nats_servers

log = logging.getLogger("ledger.remote")

ENTRY_SUBJECT = "ledger.entry"
CHECKPOINT_SUBJECT = "ledger.checkpoint"
COSIGNATURE_SUBJECT = "ledger.cosignature"
API_PREFIX = "ledger.api."
VERB_CHECKPOINT = "checkpoint"
VERB_CONSISTENCY = "consistency"
VERB_INCLUSION = "inclusion"
VERB_ENTRIES = "entries"
VERB_ROOTS = "roots"
VERBS = (VERB_CHECKPOINT, VERB_CONSISTENCY, VERB_INCLUSION, VERB_ENTRIES, VERB_ROOTS)
# One reply stays well under NATS's default 1 MiB max_payload.
MAX_ENTRIES_PER_REPLY = 1000
MAX_ENTRIES_REPLY_BYTES = 512 * 1024


class RemoteError(LedgerError):
    """The hub's ledger API could not be reached, or answered with an error."""


def ok_reply(result: dict[str, Any]) -> bytes:
    return canonical_encode({"ok": True, "result": result})


def error_reply(message: str) -> bytes:
    return canonical_encode({"ok": False, "error": message})


def read_reply(data: bytes, what: str) -> dict[str, Any]:
    """The `result` map of a reply; `RemoteError` for an error reply or a malformed one."""
    try:
        reply = canonical_decode(data)
    except EncodingError as exc:
        raise RemoteError(f"{what}: malformed reply from the hub: {exc}") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise RemoteError(f"{what}: malformed reply from the hub")
    if not reply["ok"]:
        raise RemoteError(f"{what}: the hub says: {reply.get('error')}")
    result = reply.get("result")
    if not isinstance(result, dict):
        raise RemoteError(f"{what}: malformed reply from the hub (no result map)")
    return result


def tree_hash_named(name: object) -> TreeHash:
    if not isinstance(name, str) or name not in HASHES:
        raise RemoteError(f"the hub names an unknown Merkle tree hash {name!r:.40}")
    return HASHES[name]


def _hashes(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(h, bytes) for h in value):
        raise RemoteError(f"{what}: the hub's reply has no list of hashes")
    return list(value)


def entry_from_feed(msg: Msg) -> Entry:
    """An entry from the hub's `ledger.entry` feed: the body, with `Ledger-Prev` and
    `Ledger-Hash` (hex) headers. The hash is not checked here (see `Entry.hash_matches`)."""
    headers = msg.headers or {}
    try:
        prev = bytes.fromhex(headers["Ledger-Prev"])
        digest = bytes.fromhex(headers["Ledger-Hash"])
    except (KeyError, ValueError) as exc:
        raise EntryError(f"feed message without valid Ledger-Prev/Ledger-Hash: {exc}") from exc
    return Entry.from_body(msg.data, prev, digest)


def _entry_rows(rows: object, what: str) -> list[Entry]:
    if not isinstance(rows, list):
        raise RemoteError(f"{what}: malformed reply")
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3
                and all(isinstance(x, bytes) for x in row)):
            raise RemoteError(f"{what}: malformed entry in the reply")
        try:
            out.append(Entry.from_body(row[0], row[1], row[2]))
        except LedgerError as exc:
            raise RemoteError(f"{what}: malformed entry in the reply: {exc}") from exc
    return out


@dataclass(frozen=True)
class RemoteCheckpoint:
    note: bytes
    size: int
    tree_hash: TreeHash


@dataclass(frozen=True)
class NatsLogin:
    """How a witness or `ledger tail` signs in to the hub's NATS server: a user and
    password (the hub's `witness` user, HOME/nats/credentials.toml on the hub) and, when
    the server runs TLS, the CA certificate that signed its certificate (HOME/nats/tls/
    ca.pem). Credentials may also sit in the URL (nats://user:password@host:port)."""

    user: str | None = None
    password: str | None = None
    ca_file: Path | None = None

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.ca_file is not None:
            try:
                # Trusts only this CA, and checks the server's name against its certificate.
                opts["tls"] = ssl.create_default_context(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise RemoteError(f"cannot use {self.ca_file} as the NATS CA: {exc}") from exc
        return opts


class LedgerClient:
    """A connection to a hub's ledger API. Use `await LedgerClient.connect(url)`."""

    def __init__(self, nc: NATS, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout

    @classmethod
    async def connect(cls, url: str, timeout: float = 10.0, name: str = "ledger",
                      login: NatsLogin | None = None) -> LedgerClient:
        options = (login or NatsLogin()).options()
        errors: list[Exception] = []

        async def keep(exc: Exception) -> None:
            # nats-py prints a traceback per error by default; the caller reports it.
            errors.append(exc)
            log.debug("NATS: %s", exc)

        try:
            # nats-py can stall after a failed TLS handshake instead of raising: bound it.
            nc = await asyncio.wait_for(
                nats.connect(nats_servers(url), name=name, connect_timeout=timeout,
                             max_reconnect_attempts=3, allow_reconnect=True,
                             error_cb=keep, **options),
                timeout)
        except (OSError, NatsError, TimeoutError) as exc:
            why = errors[-1] if errors else exc
            raise RemoteError(f"cannot reach NATS at {url}: {why or type(why).__name__}") from exc
        return cls(nc, timeout)

    @classmethod
    async def connect_for_good(cls, url: str, timeout: float = 10.0, name: str = "ledger",
                               login: NatsLogin | None = None,
                               stop: asyncio.Event | None = None) -> LedgerClient:
        """Connect, retrying for ever (one log line per failed attempt with its reason,
        exponential backoff; `ledger.retry.Stopped` when `stop` is set), and reconnect
        for ever afterwards: for `ledger witness`, which must outlive NATS outages."""
        options = (login or NatsLogin()).options()

        async def bounded(servers: str, **more: Any) -> Any:
            # nats-py can stall after a failed TLS handshake instead of raising: bound it.
            return await asyncio.wait_for(nats.connect(servers, **more), timeout + 1)

        nc = await connect_for_good(bounded, url, log=log, stop=stop, name=name,
                                    connect_timeout=timeout, **options)
        return cls(nc, timeout)

    async def _request(self, subject: str, payload: bytes, what: str) -> dict[str, Any]:
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout)
        except (NatsError, TimeoutError) as exc:
            raise RemoteError(f"{what}: no answer on {subject} ({type(exc).__name__}); "
                              "is the hub running?") from exc
        return read_reply(msg.data, what)

    async def call(self, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request(API_PREFIX + verb, canonical_encode(body), f"ledger.api.{verb}")

    async def checkpoint(self, size: int | None = None) -> RemoteCheckpoint:
        """The latest checkpoint (or the one of `size`), with the cosignatures the hub holds."""
        result = await self.call(VERB_CHECKPOINT, {} if size is None else {"size": size})
        note, got = result.get("note"), result.get("size")
        if not isinstance(note, bytes) or not isinstance(got, int):
            raise RemoteError("ledger.api.checkpoint: malformed reply")
        return RemoteCheckpoint(note, got, tree_hash_named(result.get("merkle_hash")))

    async def consistency(self, first: int, second: int) -> list[bytes]:
        result = await self.call(VERB_CONSISTENCY, {"from": first, "to": second})
        return _hashes(result.get("proof"), "ledger.api.consistency")

    async def inclusion(self, seq: int, size: int) -> list[bytes]:
        result = await self.call(VERB_INCLUSION, {"seq": seq, "size": size})
        return _hashes(result.get("proof"), "ledger.api.inclusion")

    async def entries(self, start: int, limit: int = MAX_ENTRIES_PER_REPLY) -> list[Entry]:
        result = await self.call(VERB_ENTRIES, {"start": start, "limit": limit})
        return _entry_rows(result.get("entries"), "ledger.api.entries")

    async def roots(self, before: int) -> list[Entry]:
        """The entries below tree size `before` that record a trust root (keys.rotated /
        keys.revoked), oldest first: unverified, prove each one's inclusion."""
        result = await self.call(VERB_ROOTS, {"before": before})
        return _entry_rows(result.get("entries"), "ledger.api.roots")

    async def submit_cosignature(self, note: bytes) -> dict[str, Any]:
        """Hand a cosigned checkpoint note to the hub, which stores the cosignature."""
        return await self._request(COSIGNATURE_SUBJECT, note, COSIGNATURE_SUBJECT)

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]]
                        ) -> Subscription:
        sub = await self.nc.subscribe(subject, cb=cb)
        await self.nc.flush(timeout=max(1, int(self.timeout)))
        return sub

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def __aenter__(self) -> LedgerClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

"""The hub's public ledger API: unsigned request/reply for auditors and witnesses.

    ledger.api.checkpoint   {} | {size}        -> {note, size, merkle_hash}
    ledger.api.consistency  {from, to}         -> {proof: [bin], merkle_hash}
    ledger.api.inclusion    {seq, size}        -> {proof: [bin], leaf_hash, merkle_hash}
    ledger.api.entries      {start, limit?}    -> {entries: [[body, prev, hash], ...]}
    ledger.api.roots        {before}           -> {entries: [[body, prev, hash], ...]}
                            (the keys.rotated / keys.revoked entries below `before`)
    ledger.cosignature      a cosigned note    -> {size, stored: [witness names]}

Everything here is public and checkable: proofs are verified by the client against a
signed checkpoint, so the API needs no authentication (the ledger is not secret to its
auditors; NATS permissions decide who can reach it). Messages are canonical msgpack
(ledger/net/remote.py has the client and the wire constants; docs/PROTOCOL.md "Ledger API").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from hub.commands.outcome import Body
from hub.errors import Refused
from hub.home.config import HubConfig
from hub.home.replies import ReplyGuard
from hub.log.checkpointer import Checkpointer, CosignatureRefused
from ledger.encoding import canonical_decode
from ledger.errors import EncodingError, LedgerError
from ledger.log_keys import ROOT_CHANGE_KINDS
from ledger.net.remote import (
    API_PREFIX,
    COSIGNATURE_SUBJECT,
    MAX_ENTRIES_PER_REPLY,
    MAX_ENTRIES_REPLY_BYTES,
    VERB_CHECKPOINT,
    VERB_CONSISTENCY,
    VERB_ENTRIES,
    VERB_INCLUSION,
    VERB_ROOTS,
    error_reply,
    ok_reply,
)
from ledger.storage import query
from ledger.storage.store import LedgerStore

log = logging.getLogger("hub.ledger_api")

MAX_REQUEST_BYTES = 64 * 1024
API_QUEUE = "hub-ledger-api"  # every hub process's queue group for the public API


class ApiRefused(Refused):
    """A request the API answers with an error (the message goes back to the caller)."""


class LedgerApi:
    def __init__(self, store: LedgerStore, checkpointer: Checkpointer,
                 replies: ReplyGuard | None = None) -> None:
        self.store = store
        # Where answers may go (hub/home/replies.py); shared with the operator API.
        self.replies = replies if replies is not None else ReplyGuard()
        self._nc: NATS | None = None
        self.checkpointer = checkpointer
        self.checkpoints = checkpointer.checkpoints
        self._subs: list[Subscription] = []
        # Called with the tree size after cosignatures were stored (hub/log/transparency.py).
        self.on_cosigned: Callable[[int], Awaitable[object]] | None = None
        self._verbs: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            VERB_CHECKPOINT: self.checkpoint,
            VERB_CONSISTENCY: self.consistency,
            VERB_INCLUSION: self.inclusion,
            VERB_ENTRIES: self.entries,
            VERB_ROOTS: self.roots,
        }

    async def start(self, nc: NATS) -> None:
        self._nc = nc
        # Queue groups: with several hub processes one of them answers each request.
        self._subs.append(await nc.subscribe(API_PREFIX + ">", queue=API_QUEUE,
                                             cb=self._on_request))
        self._subs.append(await nc.subscribe(COSIGNATURE_SUBJECT, queue=API_QUEUE,
                                             cb=self._on_cosignature))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    # -- transport -----------------------------------------------------------------

    def _may_answer(self, msg: Msg) -> bool:
        """A request whose reply subject the hub may not write to is dropped unanswered
        (and, for a cosignature, not stored): the hub is no confused deputy."""
        return not msg.reply or self.replies.public_reply(msg.reply, msg.subject)

    async def _on_request(self, msg: Msg) -> None:
        if not self._may_answer(msg):
            return
        verb = msg.subject[len(API_PREFIX):]
        try:
            handler = self._verbs.get(verb)
            if handler is None:
                raise ApiRefused(f"unknown verb {verb!r}; known: {', '.join(self._verbs)}")
            if len(msg.data) > MAX_REQUEST_BYTES:
                raise ApiRefused(f"request is over {MAX_REQUEST_BYTES} bytes")
            body = canonical_decode(msg.data) if msg.data else {}
            if not isinstance(body, dict):
                raise ApiRefused("the request must be a msgpack map")
            reply = ok_reply(handler(body))
        except (ApiRefused, EncodingError, LedgerError) as exc:
            reply = error_reply(str(exc))
        except Exception as exc:  # keep serving
            log.exception("ledger.api.%s failed", verb)
            reply = error_reply(f"internal error in {verb}: {exc}")
        await self._respond(msg, reply)

    async def _on_cosignature(self, msg: Msg) -> None:
        if not self._may_answer(msg):
            return
        cosigned: int | None = None
        try:
            size, stored = self.checkpointer.accept_cosignature(msg.data)
            reply = ok_reply({"size": size, "stored": stored})
            cosigned = size
        except (CosignatureRefused, LedgerError) as exc:
            reply = error_reply(str(exc))
        except Exception as exc:
            log.exception("storing a cosignature failed")
            reply = error_reply(f"internal error: {exc}")
        await self._respond(msg, reply)
        if self.on_cosigned is not None and cosigned is not None:
            try:
                await self.on_cosigned(cosigned)
            except Exception:  # publishing proofs must not stop the API
                log.exception("after the cosignature of tree size %d", cosigned)

    async def _respond(self, msg: Msg, reply: bytes) -> None:
        # Checked by _may_answer on arrival. Not msg.respond(): that would echo the
        # request's headers, which the requester chose.
        if msg.reply and self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, reply)

    # -- verbs (synchronous, O(log n) reads each) -----------------------------------

    def checkpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        if "size" in body:
            size = Body(body, ApiRefused).integer("size")
            found = self.checkpoints.get(size)
            if found is None:
                raise ApiRefused(f"no checkpoint of tree size {size}")
        else:
            found = self.checkpoints.latest()
            if found is None:
                raise ApiRefused("no checkpoint has been signed yet")
        return {"note": found.full_note(), "size": found.size,
                "merkle_hash": self.store.tree_hash.name}

    def consistency(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = Body(body, ApiRefused)
        proof = self.store.consistency_proof(fields.integer("from"), fields.integer("to"))
        return {"proof": proof, "merkle_hash": self.store.tree_hash.name}

    def inclusion(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = Body(body, ApiRefused)
        seq, size = fields.integer("seq"), fields.integer("size")
        proof = self.store.inclusion_proof(seq, size)
        return {"proof": proof, "leaf_hash": self.store.leaf_hash(seq),
                "merkle_hash": self.store.tree_hash.name}

    def entries(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = Body(body, ApiRefused)
        start = fields.integer("start")
        limit = min(fields.integer("limit", MAX_ENTRIES_PER_REPLY), MAX_ENTRIES_PER_REPLY)
        rows: list[list[bytes]] = []
        total = 0
        for entry in self.store.iter_entries(start, batch=max(1, min(limit, 256))):
            if len(rows) >= limit or (rows and total + len(entry.body) > MAX_ENTRIES_REPLY_BYTES):
                break
            rows.append([entry.body, entry.prev, entry.hash])
            total += len(entry.body) + 64
        return {"entries": rows}


    def roots(self, body: dict[str, Any]) -> dict[str, Any]:
        """The entries recording trust roots below tree size `before`: how a witness
        follows a log-key rotation (ledger/net/witness_runner.py). Few, so unpaged."""
        before = Body(body, ApiRefused).integer("before")
        flt = query.EntryFilter(kinds=ROOT_CHANGE_KINDS, before_seq=before)
        with self.store.engine.connect() as conn:
            rows = [[e.body, e.prev, e.hash] for e in query.iter_entries(conn, flt)]
        return {"entries": rows[-MAX_ENTRIES_PER_REPLY:]}


@dataclass
class LedgerPublishing:
    """The checkpointer and the public ledger API, started and stopped together."""

    checkpointer: Checkpointer
    api: LedgerApi

    async def stop(self) -> None:
        await self.api.stop()
        await self.checkpointer.stop()


async def start_ledger_publishing(
    config: HubConfig, store: LedgerStore, nc: NATS, js: JetStreamContext,
    replies: ReplyGuard | None = None,
) -> LedgerPublishing:
    """Start checkpoint signing and the `ledger.api.*` / `ledger.cosignature` handlers."""
    checkpointer = Checkpointer.from_config(config, store)
    api = LedgerApi(store, checkpointer, replies)
    await api.start(nc)
    await checkpointer.start(nc, js)
    return LedgerPublishing(checkpointer, api)

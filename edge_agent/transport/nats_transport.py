"""The agent's transport over NATS: `UpdateSource` and `ReportSink`.

Every nats-py exception leaves this module as a `TransferError` (edge_agent.errors):
`NotPublished` when a bucket or key is not there, `FetchError` otherwise. The device
runs no JetStream API call and makes no consumer (docs/PROTOCOL.md "Permissions"):
keys and blobs are read with direct gets and keys watched by hint
(edge_agent.transport.direct, edge_agent.transport.objects); a report is a JetStream
publish, acknowledged by the REPORTS stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.client import Client as NATS

from edge_agent.errors import FetchError, NotPublished
from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    MANIFESTS_BUCKET,
    RELEASES_BUCKET,
    ROOT_LATEST_KEY,
    ROOTS_BUCKET,
    TIMESTAMP_KEY,
    TRANSPARENCY_BUCKET,
    assignment_key,
    root_key,
)
from edge_agent.transport import Chunk, KeyUpdates, ObjectRef, objects
from edge_agent.transport.connect import NatsAuth, connect_retrying
from edge_agent.transport.direct import KeyHints, direct_get

log = logging.getLogger("edge_agent.nats")


async def _kv_get(nc: NATS, bucket: str, key: str) -> bytes | None:
    """A key's value; None when it is not there or deleted. NotPublished: no bucket."""
    stored = await direct_get(nc, f"KV_{bucket}", subject=f"$KV.{bucket}.{key}")
    if stored is None or stored.deleted:
        return None
    return stored.data


class NatsTransport:
    """One NATS connection; `UpdateSource` and `ReportSink` over its JetStream."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()  # publish only: the PubAck of a report
        self._watches: weakref.WeakSet[KeyHints] = weakref.WeakSet()
        self._publish_failed = False  # the last report publish failed

    @classmethod
    async def connect(
        cls, url: str, auth: NatsAuth, *, name: str,
        on_reconnect: Callable[[], Awaitable[None]],
        stop: asyncio.Event | None = None,
    ) -> NatsTransport:
        """Connect for good: retry (one log line per failure, with its reason and
        backoff) until connected or `stop` is set (ledger.retry.Stopped); reconnect
        for ever afterwards."""
        made: list[NatsTransport] = []

        async def reconnected() -> None:
            for transport in made:  # hints may have been lost while disconnected
                transport.kick_watches()
            await on_reconnect()

        nc = await connect_retrying(url, auth, name=name, log=log, stop=stop,
                                    reconnected_cb=reconnected)
        made.append(cls(nc))
        return made[0]

    def kick_watches(self) -> None:
        """Have every live watch read its key again."""
        for watch in list(self._watches):
            watch.kick()

    async def close(self) -> None:
        await self.nc.close()

    # ------------------------------------------------------------ UpdateSource

    async def manifest(self, key: str) -> bytes:
        try:
            value = await _kv_get(self.nc, MANIFESTS_BUCKET, key)
        except NotPublished as exc:
            # No responder for the bucket: not there, or not yet again (a server that
            # is recovering its streams after a restart). Worth trying again; only a
            # missing key refuses the update.
            raise FetchError(f"cannot read release manifest {key}: {exc}") from exc
        except FetchError as exc:
            raise FetchError(f"cannot read release manifest {key}: {exc}") from exc
        if value is None:
            raise NotPublished(f"release manifest {key} not found")
        return value

    async def inclusion_bundle(self, key: str) -> bytes:
        try:
            value = await _kv_get(self.nc, TRANSPARENCY_BUCKET, key)
        except NotPublished as exc:
            raise NotPublished("no transparency proof published yet") from exc
        except FetchError as exc:
            raise FetchError(f"cannot read the transparency proof: {exc}") from exc
        if value is None:
            raise NotPublished("no transparency proof published yet")
        return value

    async def latest_root(self) -> bytes | None:
        try:
            return await _kv_get(self.nc, ROOTS_BUCKET, ROOT_LATEST_KEY)
        except NotPublished:
            return None  # no rotation published (or an older hub)
        except FetchError as exc:
            raise FetchError(f"cannot read the newest trust root: {exc}") from exc

    async def root(self, version: int) -> bytes | None:
        try:
            return await _kv_get(self.nc, ROOTS_BUCKET, root_key(version))
        except NotPublished as exc:  # no bucket (yet again): not "no such root"
            raise FetchError(f"cannot read trust root {version}: {exc}") from exc
        except FetchError as exc:
            raise FetchError(f"cannot read trust root {version}: {exc}") from exc

    async def _watch(self, bucket: str, key: str) -> KeyUpdates:
        watch = await KeyHints.start(self.nc, bucket, key)
        self._watches.add(watch)
        return watch

    async def timestamp(self) -> bytes | None:
        try:
            return await _kv_get(self.nc, ROOTS_BUCKET, TIMESTAMP_KEY) or None
        except NotPublished:
            return None  # no roots bucket (yet): a hub that signs none
        except FetchError as exc:
            raise FetchError(f"cannot read the timestamp: {exc}") from exc

    async def watch_assignment(self, device: str) -> KeyUpdates:
        try:
            return await self._watch(ASSIGNMENTS_BUCKET, assignment_key(device))
        except NotPublished as exc:
            raise NotPublished("assignments bucket not there yet") from exc

    async def watch_latest_root(self) -> KeyUpdates:
        return await self._watch(ROOTS_BUCKET, ROOT_LATEST_KEY)

    async def blob_ref(self, digest: str, size: int) -> ObjectRef:
        return await objects.object_ref(self.nc, RELEASES_BUCKET, digest, size)

    async def blob_chunks(
        self, ref: ObjectRef, size: int, *, received: int, chunks_seen: int,
        start_seq: int | None, batch: int, timeout: float,
    ) -> AsyncIterator[Chunk]:
        # `batch` is the consumer's batch of an older transport: a direct get reads one
        # chunk per request.
        async for chunk in objects.iter_chunks_from(
            self.nc, RELEASES_BUCKET, ref, size, received=received, chunks_seen=chunks_seen,
            start_seq=start_seq, timeout=timeout,
        ):
            yield chunk

    # ------------------------------------------------------------ ReportSink

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        try:
            await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected or stream not there yet
            self._publish_failed = True
            raise FetchError(f"{exc}") from exc
        if self._publish_failed:
            # The hub answers again after it did not: the path to it was broken, maybe
            # with this connection up all along (an edge site's leaf node whose uplink
            # was cut), so hints published meanwhile were lost: read the keys again.
            self._publish_failed = False
            self.kick_watches()


async def close_quietly(transport: NatsTransport, timeout: float) -> None:
    """Close, bounded; a connection that is already gone is fine."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(transport.close(), timeout)

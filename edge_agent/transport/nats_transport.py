"""The agent's transport over NATS JetStream: `UpdateSource` and `ReportSink`.

Every nats-py exception leaves this module as a `TransferError` (edge_agent.errors):
`NotPublished` when a bucket or key is not there, `FetchError` otherwise. Blob reads
go through edge_agent.transport.objects, the assignment watch through
edge_agent.transport.kv_watch (see their docstrings for the nats-py workarounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

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
from edge_agent.transport import Chunk, KeyUpdates, ObjectRef, buckets, objects
from edge_agent.transport.connect import NatsAuth, connect_retrying
from edge_agent.transport.kv_watch import KeyWatch, flow_control_without_polling

_MISSING = (BucketNotFoundError, NotFoundError, KeyNotFoundError)


class _AssignmentUpdates:
    def __init__(self, watch: KeyWatch) -> None:
        self._watch = watch

    async def updates(self, timeout: float) -> bytes | None:
        update = await self._watch.updates(timeout)
        return update.value if update.operation is None else None  # None: a delete/purge

    def wake(self) -> None:
        self._watch.wake()

    async def stop(self) -> None:
        await self._watch.stop()


class _KvUpdates:
    """nats-py's own KV watcher (the `roots` bucket: every device may read all of it)."""

    def __init__(self, watcher: Any) -> None:
        self._watcher = watcher

    async def updates(self, timeout: float) -> bytes | None:
        entry = await self._watcher.updates(timeout=timeout)
        return (entry.value or None) if entry is not None else None

    def wake(self) -> None:
        pass  # the 30 s timeout bounds the wait

    async def stop(self) -> None:
        await self._watcher.stop()


log = logging.getLogger("edge_agent.nats")

class NatsTransport:
    """One NATS connection; `UpdateSource` and `ReportSink` over its JetStream."""

    def __init__(self, nc: NATS, js_domain: str | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(domain=js_domain)

    @classmethod
    async def connect(
        cls, url: str, auth: NatsAuth, *, name: str,
        on_reconnect: Callable[[], Awaitable[None]],
        stop: asyncio.Event | None = None, js_domain: str | None = None,
    ) -> NatsTransport:
        """Connect for good: retry (one log line per failure, with its reason and
        backoff) until connected or `stop` is set (ledger.retry.Stopped); reconnect
        for ever afterwards."""
        nc = await connect_retrying(url, auth, name=name, log=log, stop=stop,
                                    reconnected_cb=on_reconnect)
        return cls(nc, js_domain)

    async def close(self) -> None:
        await self.nc.close()

    # ------------------------------------------------------------ UpdateSource

    async def manifest(self, key: str) -> bytes:
        try:
            kv = await buckets.key_value(self.js, MANIFESTS_BUCKET)
            entry = await kv.get(key)
        except KeyNotFoundError as exc:
            raise NotPublished(f"release manifest {key} not found") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected, timed out
            raise FetchError(f"cannot read release manifest {key}: {exc!r}") from exc
        return entry.value or b""

    async def inclusion_bundle(self, key: str) -> bytes:
        try:
            kv = await self.js.key_value(TRANSPARENCY_BUCKET)
            return (await kv.get(key)).value or b""
        except _MISSING as exc:
            raise NotPublished("no transparency proof published yet") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected, timed out
            raise FetchError(f"cannot read the transparency proof: {exc!r}") from exc

    async def latest_root(self) -> bytes | None:
        try:
            kv = await buckets.key_value(self.js, ROOTS_BUCKET)
            return (await kv.get(ROOT_LATEST_KEY)).value or b""
        except _MISSING:
            return None  # no rotation published (or an older hub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise FetchError(f"cannot read the newest trust root: {exc!r}") from exc

    async def root(self, version: int) -> bytes | None:
        try:
            kv = await buckets.key_value(self.js, ROOTS_BUCKET)
            return (await kv.get(root_key(version))).value or b""
        except KeyNotFoundError:
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise FetchError(f"cannot read trust root {version}: {exc!r}") from exc

    async def timestamp(self) -> bytes | None:
        try:
            kv = await buckets.key_value(self.js, ROOTS_BUCKET)
            return (await kv.get(TIMESTAMP_KEY)).value or None
        except _MISSING:
            return None  # withheld, deleted, or a hub that signs none
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise FetchError(f"cannot read the timestamp: {exc!r}") from exc

    async def watch_assignment(self, device: str) -> KeyUpdates:
        # Not kv.watch(): its consumer-create subject does not name the key, so the
        # server could not confine a device to its own (edge_agent/transport/kv_watch.py).
        try:
            watch = await KeyWatch.start(self.js, ASSIGNMENTS_BUCKET, assignment_key(device))
        except (BucketNotFoundError, NotFoundError) as exc:
            raise NotPublished("assignments bucket not there yet") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise FetchError(f"{exc}") from exc
        return _AssignmentUpdates(watch)

    async def watch_latest_root(self) -> KeyUpdates:
        try:
            kv = await buckets.key_value(self.js, ROOTS_BUCKET)
            watcher = await kv.watch(ROOT_LATEST_KEY)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no bucket yet, or reconnecting
            raise FetchError(f"{exc}") from exc
        flow_control_without_polling(getattr(watcher, "_sub", None))
        return _KvUpdates(watcher)

    async def blob_ref(self, digest: str, size: int) -> ObjectRef:
        return await objects.object_ref(self.js, RELEASES_BUCKET, digest, size)

    async def blob_chunks(
        self, ref: ObjectRef, size: int, *, received: int, chunks_seen: int,
        start_seq: int | None, batch: int, timeout: float,
    ) -> AsyncIterator[Chunk]:
        async for chunk in objects.iter_chunks_from(
            self.js, RELEASES_BUCKET, ref, size, received=received, chunks_seen=chunks_seen,
            start_seq=start_seq, batch=batch, timeout=timeout,
            # A device may not delete consumers (hub/home/nats_config.py): waiting for
            # the refused request would cost every download its timeout. It expires.
            delete_consumer=False,
        ):
            yield chunk

    # ------------------------------------------------------------ ReportSink

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        try:
            await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected or stream not there yet
            raise FetchError(f"{exc}") from exc


async def close_quietly(transport: NatsTransport, timeout: float) -> None:
    """Close, bounded; a connection that is already gone is fine."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(transport.close(), timeout)

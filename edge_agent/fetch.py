"""Fast, bounded read of a model blob from the JetStream Object Store.

nats-py's stock `ObjectStore.get` uses a push consumer with flow control that
stalls ~250 ms per window (upstream nats.py issue #703). We read the object's
chunk subject with an ephemeral pull consumer instead, in batches, and hand the
bytes on as they come, so the caller streams them to disk and never holds the
whole model in memory. Reading stops at the size the signed manifest states:
a longer object is refused (TUF's "endless data" attack) without reading it all.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ObjectNotFoundError

OBJ_STREAM = "OBJ_{bucket}"
OBJ_CHUNKS = "$O.{bucket}.C.{nuid}"
FETCH_BATCH = 64


class FetchError(Exception):
    """The transfer failed (network, missing object); retrying may help."""


class BlobTooLarge(Exception):
    """The object holds more bytes than the manifest states: the data is bad."""


async def iter_object_chunks(
    js: JetStreamContext,
    bucket: str,
    name: str,
    expected_size: int,
    timeout: float = 10.0,
) -> AsyncIterator[bytes]:
    """Yield the object's bytes in order, never more than `expected_size` of them."""
    obs = await js.object_store(bucket)
    try:
        info = await obs.get_info(name)
    except (ObjectNotFoundError, NotFoundError) as exc:
        raise FetchError(f"model blob {name} is not in the object store") from exc
    if not info.nuid:
        raise FetchError(f"model blob {name} has no chunks (deleted?)")
    if info.size is not None and info.size > expected_size:
        raise BlobTooLarge(
            f"object store says the blob has {info.size} bytes; the manifest says {expected_size}"
        )
    subject = OBJ_CHUNKS.format(bucket=bucket, nuid=info.nuid)
    sub = await js.pull_subscribe(
        subject,
        stream=OBJ_STREAM.format(bucket=bucket),
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
        ),
    )
    received = 0
    chunks_left = info.chunks or 0
    try:
        while chunks_left > 0:
            try:
                msgs = await sub.fetch(min(FETCH_BATCH, chunks_left), timeout=timeout)
            except TimeoutError as exc:
                raise FetchError(
                    f"timed out reading {name} after {received} of {expected_size} bytes"
                ) from exc
            for msg in msgs:
                chunks_left -= 1
                received += len(msg.data)
                if received > expected_size:
                    raise BlobTooLarge(
                        f"blob {name} is longer than the {expected_size} bytes the manifest states"
                    )
                yield msg.data
    finally:
        # The connection may already be gone; the ephemeral consumer expires anyway.
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if received != expected_size:
        raise FetchError(f"blob {name} ended after {received} of {expected_size} bytes")

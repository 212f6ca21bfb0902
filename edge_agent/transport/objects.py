"""Fast, bounded, resumable read of a model blob from the JetStream Object Store.

nats-py's stock `ObjectStore.get` uses a push consumer with flow control that
stalls ~250 ms per window (upstream nats.py issue #703). We read the object's
chunk subject with an ephemeral pull consumer instead, in batches, and hand the
chunks on as they come, so the caller streams them to disk and never holds the
whole model in memory. Reading stops at the size the signed manifest states:
a longer object is refused (TUF's "endless data" attack) without reading it all.

Every chunk carries its stream sequence, so a reader that lost its connection can
start a new consumer at the sequence after the last chunk it got
(`DeliverPolicy.BY_START_SEQUENCE`) instead of starting over. Chunks are checked for
continuity: each must be the consumer's next delivery and come later in the stream. The
consumer does not redeliver (AckPolicy.NONE), so a message lost with a reset connection
would otherwise be a silent gap in the file; it is a FetchError instead, and the caller
resumes after the last chunk it has in order.

Errors are split by meaning: `BlobTooLarge` (the data is bad, don't retry) and
`FetchError` (the transfer failed: missing object, timeout, lost connection;
retrying may help). Any other exception from the NATS client becomes a FetchError.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ObjectNotFoundError, ServiceUnavailableError

from edge_agent.errors import BlobTooLarge, FetchError
from edge_agent.transport import Chunk, ObjectRef, buckets

OBJ_STREAM = "OBJ_{bucket}"
OBJ_CHUNKS = "$O.{bucket}.C.{nuid}"
FETCH_BATCH = 64


async def object_ref(
    js: JetStreamContext, bucket: str, name: str, expected_size: int
) -> ObjectRef:
    """Read the object's metadata; refuse an object whose stated size is too big."""
    try:
        obs = await buckets.object_store(js, bucket)
        info = await obs.get_info(name)
    except (ObjectNotFoundError, NotFoundError) as exc:
        raise FetchError(f"model blob {name} is not in the object store") from exc
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise FetchError(f"cannot read the metadata of blob {name}: {exc!r}") from exc
    if not info.nuid:
        raise FetchError(f"model blob {name} has no chunks (deleted?)")
    if info.size is not None and info.size > expected_size:
        raise BlobTooLarge(
            f"object store says the blob has {info.size} bytes; the manifest says {expected_size}"
        )
    return ObjectRef(name=name, nuid=info.nuid, chunks=info.chunks or 0, size=info.size)


NO_RESPONDERS_RETRY_S = 5.0


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout: float,
                ) -> list[Msg]:
    """`sub.fetch`, tried again for a few seconds on "no responders". On a cluster, a
    consumer made a moment ago may not be known yet to the server this client talks
    to (its leader's subscription travels over the routes), so the first pull reaches
    nobody; such a request delivered nothing, so asking again loses nothing."""
    deadline = time.monotonic() + NO_RESPONDERS_RETRY_S
    while True:
        try:
            return await sub.fetch(batch, timeout=timeout)
        except ServiceUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def iter_chunks_from(
    js: JetStreamContext,
    bucket: str,
    ref: ObjectRef,
    expected_size: int,
    *,
    received: int = 0,
    chunks_seen: int = 0,
    start_seq: int | None = None,
    batch: int = FETCH_BATCH,
    timeout: float = 10.0,
    delete_consumer: bool = True,
) -> AsyncIterator[Chunk]:
    """Yield the object's chunks in order, starting after what the caller already has.

    `received` bytes in `chunks_seen` chunks were read before, the last of them just
    before stream sequence `start_seq` (None: from the first chunk). The total never
    exceeds `expected_size`: one byte more is `BlobTooLarge`.

    Without `delete_consumer` (a device: its NATS user may not delete consumers) the
    ephemeral consumer is left to expire after its inactive threshold.
    """
    subject = OBJ_CHUNKS.format(bucket=bucket, nuid=ref.nuid)
    if start_seq is None:
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0
        )
    else:
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq, inactive_threshold=30.0,
        )
    try:
        sub = await js.pull_subscribe(subject, stream=OBJ_STREAM.format(bucket=bucket),
                                      config=config)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise FetchError(f"cannot start reading blob {ref.name}: {exc!r}") from exc
    chunks_left = ref.chunks - chunks_seen
    delivered = 0  # this consumer's deliveries so far: each chunk must be the next one
    last_stream_seq = (start_seq or 1) - 1
    try:
        while chunks_left > 0:
            try:
                msgs = await fetch(sub, min(batch, chunks_left), timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # timeout, lost connection, consumer gone
                raise FetchError(
                    f"reading {ref.name} stopped after {received} of {expected_size} bytes: "
                    f"{exc!r}"
                ) from exc
            for msg in msgs:
                seq = msg.metadata.sequence
                if seq.consumer != delivered + 1 or seq.stream <= last_stream_seq:
                    # A message lost on the wire (a reset connection; the consumer had
                    # already sent it): never skip it. The caller resumes with a new
                    # consumer after the last chunk it has in order.
                    raise FetchError(
                        f"reading {ref.name}: chunk out of order after {received} bytes "
                        f"(delivery {seq.consumer}, expected {delivered + 1}; stream "
                        f"sequence {seq.stream} after {last_stream_seq})")
                delivered, last_stream_seq = seq.consumer, seq.stream
                chunks_left -= 1
                received += len(msg.data)
                if received > expected_size:
                    raise BlobTooLarge(
                        f"blob {ref.name} is longer than the {expected_size} bytes the "
                        "manifest states"
                    )
                yield Chunk(msg.data, msg.metadata.sequence.stream)
    finally:
        # The connection may already be gone; the ephemeral consumer expires anyway. Else
        # delete it now: left to expire, a fleet's downloads pile up consumers on the
        # stream (nats-server caps a stream's consumers, err 10026).
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if delete_consumer and config.name:  # nats-py names the ephemeral consumer
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    js.delete_consumer(OBJ_STREAM.format(bucket=bucket), config.name), 2.0)
    if received != expected_size:
        raise FetchError(f"blob {ref.name} ended after {received} of {expected_size} bytes")


async def iter_object_chunks(
    js: JetStreamContext,
    bucket: str,
    name: str,
    expected_size: int,
    timeout: float = 10.0,
) -> AsyncIterator[bytes]:
    """Yield the object's bytes in order, never more than `expected_size` of them."""
    ref = await object_ref(js, bucket, name, expected_size)
    async for chunk in iter_chunks_from(js, bucket, ref, expected_size, timeout=timeout):
        yield chunk.data

"""Fast, bounded, resumable read of a model blob from the JetStream Object Store.

A device makes no JetStream consumer (it has no JetStream API in the hub's account,
docs/PROTOCOL.md "Permissions"): it reads with direct gets (edge_agent.transport.direct).
The object's metadata is the last message on `$O.<bucket>.M.<base64 name>`; each chunk
is the next message on its chunk subject `$O.<bucket>.C.<nuid>` at or after a stream
sequence (`{"seq": N, "next_by_subj": ...}`), asked for one at a time, so the chunks are
handed on as they come, the caller streams them to disk and never holds the whole model
in memory. Reading stops at the size the signed manifest states: a longer object is
refused (TUF's "endless data" attack) without reading it all.

Every chunk carries its stream sequence (the `Nats-Sequence` header), so a reader that
lost its connection starts again at the sequence after the last chunk it got instead of
starting over. Each answer must be a message on the chunk subject at a later sequence
than the one before; one that is not, or a lost answer (a timeout), is a FetchError, and
the caller resumes after the last chunk it has in order: never a silent gap.

Errors are split by meaning: `BlobTooLarge` (the data is bad, don't retry) and
`FetchError` (the transfer failed: missing object, timeout, lost connection;
retrying may help). Any other exception from the NATS client becomes a FetchError.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS

from edge_agent.errors import BlobTooLarge, FetchError, NotPublished
from edge_agent.transport import Chunk, ObjectRef
from edge_agent.transport.direct import direct_get

OBJ_STREAM = "OBJ_{bucket}"
OBJ_CHUNKS = "$O.{bucket}.C.{nuid}"
OBJ_META = "$O.{bucket}.M.{name}"
FETCH_BATCH = 64  # kept for callers; direct gets read one chunk per request
# A nuid is one subject token of letters and digits: anything else could widen the
# chunk subject the reader asks for (a wildcard, a second token).
_NUID = re.compile(r"[A-Za-z0-9]{1,64}")


def meta_subject(bucket: str, name: str) -> str:
    """The metadata subject of object `name` (nats-py's encoding of the name)."""
    return OBJ_META.format(bucket=bucket,
                           name=base64.urlsafe_b64encode(name.encode()).decode())


def _int_or_none(value: object, field: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FetchError(f"metadata of blob {name}: {field} is not a count")
    return value


async def object_ref(nc: NATS, bucket: str, name: str, expected_size: int,
                     timeout: float = 10.0) -> ObjectRef:
    """Read the object's metadata; refuse an object whose stated size is too big."""
    stream = OBJ_STREAM.format(bucket=bucket)
    try:
        stored = await direct_get(nc, stream, subject=meta_subject(bucket, name),
                                  timeout=timeout)
    except NotPublished as exc:
        raise FetchError(f"model blob {name}: no object store ({exc})") from exc
    except FetchError as exc:
        raise FetchError(f"cannot read the metadata of blob {name}: {exc}") from exc
    if stored is None:
        raise FetchError(f"model blob {name} is not in the object store")
    try:
        info = json.loads(stored.data)
    except ValueError as exc:
        raise FetchError(f"metadata of blob {name} is not JSON") from exc
    if not isinstance(info, dict):
        raise FetchError(f"metadata of blob {name} is not a JSON object")
    nuid = info.get("nuid")
    if info.get("deleted") or not nuid:
        raise FetchError(f"model blob {name} has no chunks (deleted?)")
    if not isinstance(nuid, str) or not _NUID.fullmatch(nuid):
        raise FetchError(f"metadata of blob {name} has a malformed nuid")
    size = _int_or_none(info.get("size"), "size", name)
    chunks = _int_or_none(info.get("chunks"), "chunks", name)
    if size is not None and size > expected_size:
        raise BlobTooLarge(
            f"object store says the blob has {size} bytes; the manifest says {expected_size}"
        )
    return ObjectRef(name=name, nuid=nuid, chunks=chunks or 0, size=size)


async def iter_chunks_from(
    nc: NATS,
    bucket: str,
    ref: ObjectRef,
    expected_size: int,
    *,
    received: int = 0,
    chunks_seen: int = 0,
    start_seq: int | None = None,
    timeout: float = 10.0,
) -> AsyncIterator[Chunk]:
    """Yield the object's chunks in order, starting after what the caller already has.

    `received` bytes in `chunks_seen` chunks were read before, the last of them just
    before stream sequence `start_seq` (None: from the first chunk). The total never
    exceeds `expected_size`: one byte more is `BlobTooLarge`.
    """
    stream = OBJ_STREAM.format(bucket=bucket)
    subject = OBJ_CHUNKS.format(bucket=bucket, nuid=ref.nuid)
    last_stream_seq = (start_seq or 1) - 1
    chunks_left = ref.chunks - chunks_seen
    while chunks_left > 0:
        try:
            stored = await direct_get(
                nc, stream, body={"seq": last_stream_seq + 1, "next_by_subj": subject},
                timeout=timeout)
        except (FetchError, NotPublished) as exc:
            raise FetchError(
                f"reading {ref.name} stopped after {received} of {expected_size} bytes: "
                f"{exc}") from exc
        if stored is None:
            break  # fewer chunks than the metadata says: checked below
        if stored.subject != subject or stored.seq <= last_stream_seq:
            # Never skip or repeat: the caller resumes after the last chunk it has.
            raise FetchError(
                f"reading {ref.name}: chunk out of order after {received} bytes (subject "
                f"{stored.subject[:80]}, stream sequence {stored.seq} after "
                f"{last_stream_seq})")
        last_stream_seq = stored.seq
        chunks_left -= 1
        received += len(stored.data)
        if received > expected_size:
            raise BlobTooLarge(
                f"blob {ref.name} is longer than the {expected_size} bytes the manifest states"
            )
        yield Chunk(stored.data, stored.seq)
    if received != expected_size:
        raise FetchError(f"blob {ref.name} ended after {received} of {expected_size} bytes")


async def iter_object_chunks(
    nc: NATS,
    bucket: str,
    name: str,
    expected_size: int,
    timeout: float = 10.0,
) -> AsyncIterator[bytes]:
    """Yield the object's bytes in order, never more than `expected_size` of them."""
    ref = await object_ref(nc, bucket, name, expected_size, timeout)
    async for chunk in iter_chunks_from(nc, bucket, ref, expected_size, timeout=timeout):
        yield chunk.data

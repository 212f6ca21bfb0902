"""Operator uploads, through a staging stream the hub controls (issue 12, class 3).

Operators hold no Object Store rights at all. The `hub` CLI publishes a file's chunks
to `upload.<its key id>.<upload id>` in the hub-owned stream UPLOADS (with JetStream
acks; an operator's NATS user may publish only under its own key id), then sends the
signed command that names the upload id, the digest and the size. The hub then:

1. refuses a size over the limit, and counts the upload's messages on the server
   before reading any: more or fewer than the size needs is refused unread (every
   message is at most UPLOAD_CHUNK_BYTES: the stream's max message size), so a hub
   never reads more than the command's own (bounded) size;
2. reads the chunks in order, each carrying its index (a gap, a repeat, a short chunk
   in the middle is refused), into a private file, hashing as it goes;
3. compares size and BLAKE3 digest with the command's;
4. purges the upload's subject, accepted or refused: nothing of it outlives the command.

Only then may the caller store the file in the `models` bucket (`store_blob`): a refused
or abandoned upload never reaches a bucket. Uploads are bound to the signer: the
subject is made from the command's key id, so naming another operator's upload id reads
an empty subject of one's own ("unknown upload"). An upload nobody claims leaves with
the stream's max age.

`copy_blob` puts a stored blob in the `releases` bucket (what devices may read) at
release, and when the reconciler finds a released blob missing there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import blake3
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig
from nats.js.errors import NotFoundError, ObjectNotFoundError, ServiceUnavailableError

from edge_agent.protocol.names import (
    UPLOAD_CHUNK_BYTES,
    UPLOAD_CHUNK_HEADER,
    UPLOAD_SUBJECTS,
    UPLOADS_STREAM,
    upload_subject,
)
from hub.errors import Refused

log = logging.getLogger("hub.uploads")

UPLOAD_ID = re.compile(r"[0-9a-f]{16,64}")
DIGEST = re.compile(r"[0-9a-f]{64}")
FETCH_BATCH = 64
READ_TIMEOUT_S = 10.0
# Room for the chunk-index header beside a full chunk (the stream's max message size
# counts headers too).
HEADER_ROOM = 256
MAX_UPLOAD_MESSAGE = UPLOAD_CHUNK_BYTES + HEADER_ROOM
# Why uploads were refused (the `status` counts; docs/PROTOCOL.md "Uploads").
REASONS = ("invalid", "too large", "unknown upload", "size", "missing chunk", "digest",
           "unreadable")


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


class UploadRefused(Refused):
    """An upload the hub will not take; the message is one line for the operator."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def uploads_stream(max_bytes: int, max_age_s: float) -> StreamConfig:
    """The staging stream: short-lived, bounded, one chunk per message; the oldest
    uploads are dropped first when it is full (their commands then fail with "missing
    chunk": upload again)."""
    return StreamConfig(
        name=UPLOADS_STREAM, subjects=[UPLOAD_SUBJECTS], max_age=max_age_s,
        max_bytes=max_bytes, max_msg_size=MAX_UPLOAD_MESSAGE, discard=DiscardPolicy.OLD,
        duplicate_window=min(120.0, max_age_s),  # a resent chunk (same Nats-Msg-Id) once
    )


def chunks_for(size: int) -> int:
    return -(-size // UPLOAD_CHUNK_BYTES)


class UploadIntake:
    """Takes operator uploads out of the staging stream (one per hub)."""

    def __init__(self) -> None:
        self.refused: Counter[str] = Counter()

    async def take(self, js: JetStreamContext, keyid: str, upload_id: str, digest: str,
                   size: int, max_bytes: int, dest: Path, what: str) -> None:
        """Read upload `upload_id` of operator `keyid` into `dest`, checked against
        `digest` and `size` (at most `max_bytes`); UploadRefused if it is not exactly
        that. The upload is purged either way."""
        try:
            try:
                await self._take(js, keyid, upload_id, digest, size, max_bytes, dest, what)
            except UploadRefused:
                raise
            except Exception as exc:  # NATS trouble mid-read: one line, not "internal error"
                raise UploadRefused("unreadable", f"cannot read upload {upload_id[:80]} "
                                    f"({type(exc).__name__}: {exc}); upload again") from exc
        except UploadRefused as exc:
            self.refused[exc.reason] += 1
            log.warning("upload refused (%s) from operator %s: %s", exc.reason, keyid, exc)
            raise
        finally:
            if UPLOAD_ID.fullmatch(upload_id):
                await purge(js, upload_subject(keyid, upload_id))

    async def discard(self, js: JetStreamContext, keyid: str, upload_id: str) -> None:
        """Purge an upload that will not be read (its command was refused first)."""
        if UPLOAD_ID.fullmatch(upload_id):
            await purge(js, upload_subject(keyid, upload_id))

    async def _take(self, js: JetStreamContext, keyid: str, upload_id: str, digest: str,
                    size: int, max_bytes: int, dest: Path, what: str) -> None:
        if not UPLOAD_ID.fullmatch(upload_id):
            raise UploadRefused("invalid", f"invalid upload id {upload_id[:80]!r} for the "
                                f"{what}: expected 16 to 64 lowercase hex digits")
        if not DIGEST.fullmatch(digest):
            raise UploadRefused("invalid", f"invalid digest {digest[:80]!r} for the {what}: "
                                "expected 64 lowercase hex digits (BLAKE3)")
        if size < 1:
            raise UploadRefused("size", f"the {what} is empty (size 0)")
        if size > max_bytes:
            raise UploadRefused("too large", f"the {what} is {size} bytes, over the "
                                f"{max_bytes}-byte limit for uploads")
        subject = upload_subject(keyid, upload_id)
        want = chunks_for(size)
        try:
            info = await js.stream_info(UPLOADS_STREAM, subjects_filter=subject)
        except NotFoundError as exc:
            raise UploadRefused("unknown upload", f"unknown upload {upload_id}: the hub has "
                                "no upload stream") from exc
        have = (info.state.subjects or {}).get(subject, 0)
        if have == 0:
            raise UploadRefused(
                "unknown upload", f"unknown upload {upload_id} for the {what}: nothing was "
                "uploaded under it by this operator key (expired, already used, or "
                "another's); upload again")
        if have > want:
            raise UploadRefused(
                "size", f"upload {upload_id} has {have} chunks, more than the {want} that "
                f"{size} bytes need: the {what} is not {size} bytes")
        if have < want:
            raise UploadRefused(
                "missing chunk", f"upload {upload_id} has {have} of the {want} chunks that "
                f"{size} bytes need: missing chunk; upload again")
        got = await _read(js, subject, upload_id, want, size, dest, what)
        if got != digest:
            raise UploadRefused("digest", f"upload {upload_id} does not match digest "
                                f"{digest[:16]}… (its BLAKE3 is {got[:16]}…)")


async def _read(js: JetStreamContext, subject: str, upload_id: str, want: int, size: int,
                dest: Path, what: str) -> str:
    """Read exactly `want` chunks of `subject` into `dest`; their BLAKE3."""
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                            inactive_threshold=30.0)
    try:
        sub = await js.pull_subscribe(subject, stream=UPLOADS_STREAM, config=config)
    except Exception as exc:
        raise UploadRefused("unreadable", f"cannot read upload {upload_id}: {exc!r}") from exc
    hasher = blake3.blake3()
    received = index = 0
    try:
        with open(dest, "wb") as fh:
            while index < want:
                try:
                    msgs = await fetch(sub, min(FETCH_BATCH, want - index),
                                       READ_TIMEOUT_S)
                except Exception as exc:  # expired under us (max age), timeout
                    raise UploadRefused(
                        "missing chunk", f"upload {upload_id} stopped after {received} of "
                        f"{size} bytes ({type(exc).__name__}): missing chunk; upload again"
                    ) from exc
                for msg in msgs:
                    label = (msg.headers or {}).get(UPLOAD_CHUNK_HEADER)
                    if label != str(index) or msg.metadata.sequence.consumer != index + 1:
                        raise UploadRefused(
                            "missing chunk", f"upload {upload_id}: missing chunk {index} "
                            f"(found chunk {label!r} in its place); upload again")
                    last = index == want - 1
                    expected = size - received if last else UPLOAD_CHUNK_BYTES
                    if len(msg.data) != expected:
                        raise UploadRefused(
                            "size", f"upload {upload_id}: chunk {index} has {len(msg.data)} "
                            f"bytes, expected {expected}: the {what} is not {size} bytes")
                    hasher.update(msg.data)
                    fh.write(msg.data)
                    received += len(msg.data)
                    index += 1
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if config.name:  # the hub may delete consumers; don't leave one to expire
            with contextlib.suppress(Exception):
                await asyncio.wait_for(js.delete_consumer(UPLOADS_STREAM, config.name), 2.0)
    return hasher.hexdigest()


async def purge(js: JetStreamContext, subject: str) -> None:
    """Drop an upload's chunks (a failure is logged: max age drops them anyway)."""
    try:
        await js.purge_stream(UPLOADS_STREAM, subject=subject)
    except Exception as exc:
        log.warning("cannot purge %s (%s); it expires with the stream's max age", subject, exc)


async def store_blob(js: JetStreamContext, bucket: str, digest: str, path: Path) -> None:
    """Put the checked file at `path` into `bucket` under its digest. Putting the same
    digest again replaces the object with the same bytes (idempotent)."""
    obs = await js.object_store(bucket)
    with open(path, "rb") as fh:
        await obs.put(digest, fh)


async def has_blob(js: JetStreamContext, bucket: str, digest: str, size: int) -> bool:
    try:
        info = await (await js.object_store(bucket)).get_info(digest)
    except (ObjectNotFoundError, NotFoundError):
        return False
    return not info.deleted and info.size == size and bool(info.nuid)


async def copy_blob(js: JetStreamContext, source: str, target: str, digest: str,
                    size: int) -> bool:
    """Copy blob `digest` from bucket `source` into `target`, checked against its digest
    on the way; nothing when `target` has it already. True if it was copied."""
    if await has_blob(js, target, digest, size):
        return False
    with tempfile.TemporaryDirectory(prefix="hub-blob-") as tmp:
        path = Path(tmp) / "blob"
        hasher = blake3.blake3()
        # The hub's own Object Store read (it holds every right in HUB), streamed to a
        # file rather than held in memory; the digest is checked before it is stored.
        with open(path, "wb") as fh:
            await (await js.object_store(source)).get(digest, writeinto=fh)
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                hasher.update(block)
        if path.stat().st_size != size or hasher.hexdigest() != digest:
            raise ValueError(f"blob {digest[:16]}… in bucket {source} does not match its "
                             "digest")
        await store_blob(js, target, digest, path)
    return True

"""The agent's one seam to the network: the only device package that imports `nats`.

The agent, the download and the reporter see only the Protocols below; the NATS
implementation (edge_agent.transport.nats_transport.NatsTransport) turns every nats-py
exception into the agent's own `TransferError` (edge_agent.errors), as python-tuf's
fetcher turns foreign errors into `DownloadError`: a bucket or key that is not there
is `NotPublished`, anything else that failed on the way is `FetchError`. A test or a
simulator can hand the agent another implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Chunk", "KeyUpdates", "ObjectRef", "ReportSink", "UpdateSource"]


@dataclass(frozen=True)
class ObjectRef:
    """Where an object's chunks are: its nuid and how many chunks the metadata claims."""

    name: str
    nuid: str
    chunks: int
    size: int | None


@dataclass(frozen=True)
class Chunk:
    data: bytes
    stream_seq: int  # sequence of this chunk's message in the object store's stream


class KeyUpdates(Protocol):
    """Updates of one watched KV key."""

    async def updates(self, timeout: float) -> bytes | None:
        """The value of the next put; None for a delete, a purge or an empty marker.
        TimeoutError if none comes within `timeout` seconds (or `wake()` was called)."""
        ...

    def wake(self) -> None:
        """Make a waiting `updates()` give up now (e.g. to re-watch after a reconnect)."""
        ...

    async def stop(self) -> None: ...


class UpdateSource(Protocol):
    """Where the signed documents and the model blobs come from."""

    async def manifest(self, key: str) -> bytes:
        """The release manifest under `key` (NotPublished if there is none)."""
        ...

    async def inclusion_bundle(self, key: str) -> bytes:
        """The transparency bundle under `key` (NotPublished if there is none yet)."""
        ...

    async def latest_root(self) -> bytes | None:
        """The newest published trust root; None if no rotation was ever published."""
        ...

    async def root(self, version: int) -> bytes | None:
        """Trust root `version`; None if it is not published."""
        ...

    async def timestamp(self) -> bytes | None:
        """The signed timestamp (names the newest root); None if none is published."""
        ...

    async def watch_assignment(self, device: str) -> KeyUpdates:
        """Watch `device`'s assignment (NotPublished: no assignments bucket yet)."""
        ...

    async def watch_latest_root(self) -> KeyUpdates:
        """Watch the newest published trust root."""
        ...

    async def blob_ref(self, digest: str, size: int) -> ObjectRef:
        """The model blob's metadata; BlobTooLarge if it claims more than `size` bytes."""
        ...

    def blob_chunks(
        self, ref: ObjectRef, size: int, *, received: int, chunks_seen: int,
        start_seq: int | None, batch: int, timeout: float,
    ) -> AsyncIterator[Chunk]:
        """The blob's chunks after what the caller has, never more than `size` bytes."""
        ...


class ReportSink(Protocol):
    """Where reports go."""

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """Publish and wait for the acknowledgement; TransferError if there is none."""
        ...

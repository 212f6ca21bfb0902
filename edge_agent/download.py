"""A resumable, bounded download of one model blob to a file on disk.

The blob streams chunk by chunk into `slots/download.partial`; the model is never
held in memory. Every `checkpoint_bytes` the partial file is fsynced and a small
sidecar, `slots/download.json`, records what is safely on disk:

    {"digest", "size", "nuid", "received", "chunks", "next_seq"}

If the connection drops, or a chunk arrives out of order (one was lost on the wire:
edge_agent.transport.objects checks continuity), the download continues from
`next_seq` (the stream sequence after the last chunk received in order) with a new
consumer, writing at `received`, the end of what it has. If the agent
restarts, the next download of the same digest truncates the partial file to the
sidecar's `received` (bytes written after the last checkpoint may be torn) and re-hashes
it, since a BLAKE3 state cannot be serialised; re-hashing a local file is cheap.
Another digest, a changed object (new nuid) or an unreadable sidecar starts over.

Only one download exists at a time (one partial file per agent), so there is nothing
to bound beyond that; the agent cancels an older download when a newer assignment
arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import blake3

from edge_agent.errors import BlobTooLarge, DigestMismatch, DiskFull, TransferError
from edge_agent.transport import UpdateSource
from ledger.durable import atomic_write

log = logging.getLogger("edge_agent.download")

PARTIAL_NAME = "download.partial"
SIDECAR_NAME = "download.json"
CHECKPOINT_BYTES = 4 * 1024 * 1024
# Batches of 16 chunks (2 MiB at the Object Store's 128 KiB chunks) bound what the
# NATS client holds in memory for us at once.
DOWNLOAD_BATCH = 16


@dataclass
class DownloadStats:
    """Bytes that came over the wire and how often a download had to resume."""

    bytes_received: int = 0
    resumed_from_disk: int = 0
    resumed_after_error: int = 0
    completed: int = 0


@dataclass
class _Progress:
    digest: str
    size: int
    nuid: str
    received: int = 0
    chunks: int = 0
    next_seq: int | None = None


class ResumableDownload:
    def __init__(
        self,
        directory: Path,
        source: UpdateSource,
        digest: str,
        size: int,
        *,
        stats: DownloadStats,
        retries: int = 5,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        on_checkpoint: Callable[[], None] | None = None,
        fetch_timeout: float = 5.0,
        before_write: Callable[[int, int], None] | None = None,
    ) -> None:
        self.partial = directory / PARTIAL_NAME
        self.sidecar = directory / SIDECAR_NAME
        self._source = source
        self.digest, self.size = digest, size
        self.last_byte_at = 0.0  # wall clock of the last chunk received (benchmarks)
        self.stats = stats
        self.retries = retries
        self.checkpoint_bytes = checkpoint_bytes
        self._on_checkpoint = on_checkpoint
        self.fetch_timeout = fetch_timeout
        self._before_write = before_write  # (offset, length): a test hook for disk faults

    # ------------------------------------------------------------ public

    async def run(self) -> Path:
        """Download (or finish downloading) the blob; return the verified file.

        Raises BlobTooLarge or DigestMismatch when the data is bad (the partial file
        is removed), TransferError when the transfer failed `retries` times in a row
        without progress (the partial file stays for the next attempt), DiskFull when
        the disk filled up (the partial file is removed: it would keep the disk full).
        """
        try:
            return await self._run()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.discard()
            raise DiskFull(f"the disk filled up while downloading {self.digest[:16]}... "
                           f"({self.size} bytes): {exc.strerror or exc}; the partial "
                           "download was removed") from exc

    async def _run(self) -> Path:
        progress, hasher = self._resume_from_disk()
        failures = 0
        mode = "r+b" if progress.received else "wb"
        with open(self.partial, mode) as fh:
            while True:
                # Every attempt appends at the end of what is known good, never where
                # the last attempt's file position happened to be (a chunk half-written
                # when the connection or the disk failed is cut off).
                fh.seek(progress.received)
                fh.truncate()
                before = progress.received
                try:
                    await self._read_into(fh, progress, hasher)
                    break
                except TransferError as exc:
                    failures = 0 if progress.received > before else failures + 1
                    if failures > self.retries:
                        self._checkpoint(fh, progress)
                        raise
                    self.stats.resumed_after_error += 1
                    log.warning("download of %s interrupted at %d/%d bytes (%s); resuming",
                                self.digest[:16], progress.received, self.size, exc)
                    await asyncio.sleep(min(2.0, 0.25 * failures))
                except (BlobTooLarge, asyncio.CancelledError, Exception) as exc:
                    if isinstance(exc, BlobTooLarge):
                        self.discard()
                    else:
                        # Cancelled (a newer assignment) or a local error: keep what is
                        # safely on disk for a later attempt.
                        with contextlib.suppress(OSError):
                            self._checkpoint(fh, progress)
                    raise
            fh.flush()
            os.fsync(fh.fileno())
        if hasher.hexdigest() != self.digest:
            self.discard()
            raise DigestMismatch(
                f"downloaded blob's BLAKE3 digest {hasher.hexdigest()[:16]}... does not "
                f"match the signed manifest's {self.digest[:16]}..."
            )
        with contextlib.suppress(FileNotFoundError):
            self.sidecar.unlink()
        self.stats.completed += 1
        return self.partial

    def discard(self) -> None:
        for path in (self.partial, self.sidecar):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ------------------------------------------------------------ internals

    async def _read_into(self, fh: IO[bytes], progress: _Progress, hasher: Any) -> None:
        ref = await self._source.blob_ref(self.digest, self.size)
        if ref.nuid != progress.nuid:
            if progress.received:
                log.info("blob %s was re-uploaded since the partial download; starting over",
                         self.digest[:16])
                fh.seek(0)
                fh.truncate()
                hasher.reset()
            progress.nuid, progress.received, progress.chunks = ref.nuid, 0, 0
            progress.next_seq = None
        last_checkpoint = progress.received
        async for chunk in self._source.blob_chunks(
            ref, self.size, received=progress.received,
            chunks_seen=progress.chunks, start_seq=progress.next_seq,
            batch=DOWNLOAD_BATCH, timeout=self.fetch_timeout,
        ):
            if self._before_write is not None:
                self._before_write(progress.received, len(chunk.data))
            fh.write(chunk.data)
            hasher.update(chunk.data)
            self.stats.bytes_received += len(chunk.data)
            self.last_byte_at = time.time()
            progress.received += len(chunk.data)
            progress.chunks += 1
            progress.next_seq = chunk.stream_seq + 1
            if progress.received - last_checkpoint >= self.checkpoint_bytes:
                self._checkpoint(fh, progress)
                last_checkpoint = progress.received

    def _checkpoint(self, fh: IO[bytes], progress: _Progress) -> None:
        """Make the first `received` bytes durable, then record that they are."""
        if not 0 <= progress.received <= self.size:
            # Never record an offset past the object's end: a resume would trust it.
            raise BlobTooLarge(f"download of {self.digest[:16]} at {progress.received} "
                               f"bytes, past the manifest's {self.size}")
        fh.flush()
        os.fsync(fh.fileno())
        atomic_write(self.sidecar, json.dumps(asdict(progress)).encode())
        if self._on_checkpoint is not None:
            self._on_checkpoint()

    def _resume_from_disk(self) -> tuple[_Progress, Any]:
        fresh = _Progress(self.digest, self.size, nuid="")
        try:
            raw = json.loads(self.sidecar.read_bytes())
            saved = _Progress(**raw)
            size_on_disk = self.partial.stat().st_size
        except FileNotFoundError:
            self.discard()
            return fresh, blake3.blake3()
        except (ValueError, TypeError, OSError) as exc:
            log.warning("download sidecar %s unreadable (%s); starting over", self.sidecar, exc)
            self.discard()
            return fresh, blake3.blake3()
        if (saved.digest, saved.size) != (self.digest, self.size) or not (
            0 <= saved.received <= min(size_on_disk, self.size)
        ):
            self.discard()
            return fresh, blake3.blake3()
        hasher = blake3.blake3()
        left = saved.received
        with open(self.partial, "rb") as fh:
            while left > 0:
                block = fh.read(min(left, 1 << 20))
                if not block:
                    break
                hasher.update(block)
                left -= len(block)
        self.stats.resumed_from_disk += 1
        log.info("resuming download of %s at %d of %d bytes", self.digest[:16],
                 saved.received, self.size)
        return saved, hasher


"""A bounded, durable outbox of reports on the device's disk.

Every report (status or telemetry window) is written to the spool before it is sent,
and its file is deleted only once JetStream has acknowledged the publish. So reports
survive a lost connection, a NATS restart and an agent restart; the message id in each
record (`<device>.<boot>.<seq>`) lets JetStream and the hub drop the copies that were
sent twice.

Layout: `DIR/<16-digit number>.rec`, one record per file, written to a temp file,
fsynced and renamed (a crash leaves the record whole or absent, never torn), in the
order they were made; `DIR/dropped` holds how many records the bound has dropped so
far. A record is canonical msgpack `{"subject", "msg_id", "data"}`.

The spool is bounded in bytes and records: when a new record would not fit, the oldest
are deleted and counted in `dropped`, which the agent reports in its telemetry windows,
so loss is never silent.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ledger.durable import atomic_write
from ledger.encoding import canonical_decode, canonical_encode
from ledger.errors import EncodingError

log = logging.getLogger("edge_agent.spool")

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_RECORDS = 20_000
_SUFFIX = ".rec"


@dataclass(frozen=True)
class SpoolRecord:
    number: int
    subject: str
    msg_id: str
    data: bytes
    size: int  # bytes on disk


class Spool:
    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_records: int = DEFAULT_MAX_RECORDS, fsync: bool = True) -> None:
        if max_bytes <= 0 or max_records <= 0:
            raise ValueError("spool bounds must be positive")
        self.dir = directory
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.fsync = fsync
        self.write_fault: Callable[[], None] | None = None  # a test hook (disk faults)
        directory.mkdir(parents=True, exist_ok=True)
        self._dropped_path = directory / "dropped"
        self.dropped = self._read_dropped()
        self._index: deque[tuple[int, int]] = deque()  # (number, size), oldest first
        self._bytes = 0
        for tmp in directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that never reached its rename
        for path in sorted(directory.glob("*" + _SUFFIX)):
            try:
                number = int(path.stem)
            except ValueError:
                continue
            size = path.stat().st_size
            self._index.append((number, size))
            self._bytes += size
        self._next = self._index[-1][0] + 1 if self._index else 0

    def __len__(self) -> int:
        return len(self._index)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:016d}{_SUFFIX}"

    def _read_dropped(self) -> int:
        try:
            return int(self._dropped_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (ValueError, OSError) as exc:
            log.warning("spool drop counter %s unreadable (%s); starting at 0",
                        self._dropped_path, exc)
            return 0

    def _write(self, path: Path, data: bytes) -> None:
        if self.write_fault is not None:
            self.write_fault()
        atomic_write(path, data, 0o644, fsync=self.fsync)

    def append(self, subject: str, msg_id: str, data: bytes) -> SpoolRecord:
        """Write a record durably (dropping the oldest if the bound needs room)."""
        body = canonical_encode({"subject": subject, "msg_id": msg_id, "data": data})
        if len(body) > self.max_bytes:
            raise ValueError(f"a {len(body)}-byte report is larger than the whole spool")
        dropped = 0
        while self._index and (self._bytes + len(body) > self.max_bytes
                               or len(self._index) >= self.max_records):
            number, size = self._index.popleft()
            self._path(number).unlink(missing_ok=True)
            self._bytes -= size
            dropped += 1
        if dropped:
            self.dropped += dropped
            self._write(self._dropped_path, str(self.dropped).encode())
            log.warning("spool full: dropped the %d oldest report(s) (%d so far)", dropped,
                        self.dropped)
        number = self._next
        self._next += 1
        self._write(self._path(number), body)
        self._index.append((number, len(body)))
        self._bytes += len(body)
        return SpoolRecord(number, subject, msg_id, data, len(body))

    def peek(self) -> SpoolRecord | None:
        """The oldest record, or None; an unreadable record is dropped and counted."""
        while self._index:
            number, size = self._index[0]
            try:
                doc = canonical_decode(self._path(number).read_bytes())
                if not isinstance(doc, dict):
                    raise EncodingError("not a map")
                return SpoolRecord(number, str(doc["subject"]), str(doc["msg_id"]),
                                   bytes(doc["data"]), size)
            except (OSError, EncodingError, KeyError, TypeError) as exc:
                log.error("spool record %d unreadable (%s); dropping it", number, exc)
                self._discard_head()
                self.dropped += 1
                with contextlib.suppress(OSError):
                    self._write(self._dropped_path, str(self.dropped).encode())
        return None

    def ack(self, record: SpoolRecord) -> None:
        """JetStream has the record: delete it (no-op if the bound already dropped it)."""
        if self._index and self._index[0][0] == record.number:
            self._discard_head()

    def _discard_head(self) -> None:
        number, size = self._index.popleft()
        self._path(number).unlink(missing_ok=True)
        self._bytes -= size

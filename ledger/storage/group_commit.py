"""Group commit: many concurrent asyncio appenders share one transaction (one fsync).

`GroupCommitter` sits in front of a `LedgerStore`. Each caller awaits its own
`append`; while one batch is being written (in a worker thread, so the event loop keeps
running), the events that arrive meanwhile are queued, and the next batch writes them
all with one `store.append_many`, in one transaction. Nobody waits for a timer: a
lone appender is written at once, and batches grow only as large as the load makes
them (up to `max_batch` events).

Every caller gets its own result: its own entries, or its own exception. When a batch
fails because of one caller (its `apply` callback raised, or its event cannot be
encoded), that caller gets the error and the others are written again without it, so
one bad event never fails its neighbours. A storage failure (`StoreError`: locked
database, lost connection) fails the whole batch: it is nobody's event.

Events are appended in the order their `append` calls were made. Each caller's
`apply(conn, entries)` runs in the worker thread, inside the batch's transaction, with
that caller's entries only; when a batch is retried, the survivors' callbacks run
again, so a callback must act only through `conn` (which is rolled back with it).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ledger.entry import Entry, check_header, encode_body
from ledger.errors import EntryError, StoreError
from ledger.storage.store import ApplyCallback, LedgerStore, NewEvent

if TYPE_CHECKING:  # store.py stays the only ledger module importing SQLAlchemy
    from sqlalchemy import Connection

DEFAULT_MAX_BATCH = 1000


@dataclass(eq=False)
class _Request:
    """One caller's `append_many`: written whole, in one batch, never split."""

    events: list[NewEvent]
    apply: ApplyCallback | None
    future: asyncio.Future[list[Entry]]


def check_event(event: NewEvent) -> None:
    """Raise `EntryError` if `event` could never be appended (cheap: the payload is only
    checked to be a map; whether it encodes is found out when it is written)."""
    check_header(0, 0 if event.ts is None else event.ts, event.kind, event.actor, event.subject)
    if not isinstance(event.payload, dict):
        raise EntryError(f"payload must be a map (dict), got {type(event.payload).__name__}")


def _encoding_problem(request: _Request) -> EntryError | None:
    for event in request.events:
        ts = 0 if event.ts is None else event.ts
        try:
            encode_body(0, ts, event.kind, event.actor, event.subject, event.payload)
        except EntryError as exc:
            return exc
    return None


class GroupCommitter:
    """Batches concurrent appends to one `LedgerStore` from asyncio code.

    `max_batch` bounds the events per transaction; one `append_many` larger than that
    is written alone, never split. Use it from one event loop. `close()` writes what is
    queued and stops; it does not close the store, which the caller owns.
    """

    def __init__(self, store: LedgerStore, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._store = store
        self._max_batch = max_batch
        self._pending: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self.transactions = 0  # batches committed
        self.appended = 0  # entries committed

    @property
    def store(self) -> LedgerStore:
        return self._store

    # -- the public surface ------------------------------------------------------------

    async def append(self, event: NewEvent, apply: ApplyCallback | None = None) -> Entry:
        """Append one event; returns its entry once the batch holding it is committed."""
        return (await self.append_many([event], apply))[0]

    async def append_many(
        self, events: Sequence[NewEvent], apply: ApplyCallback | None = None
    ) -> list[Entry]:
        """Append `events` atomically and contiguously (in one batch, never split).

        Cancelling the call before its batch is written withdraws the events; once the
        batch is being written they are appended whether or not anyone still waits.
        """
        if self._closed:
            raise StoreError(f"the group committer for {self._store.location} is closed")
        events = list(events)
        if not events:
            return []
        for event in events:
            check_event(event)  # the caller's own mistake: tell it now, not its batch
        future: asyncio.Future[list[Entry]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(events, apply, future))
        self._wake()
        return await future

    async def close(self) -> None:
        """Write everything queued, then stop. Later appends raise `StoreError`."""
        self._closed = True
        if self._writer is not None:
            self._wake()
            await self._writer

    async def __aenter__(self) -> GroupCommitter:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -- the writer task ---------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = self._take_batch()
                if batch:
                    await self._commit(batch)
        finally:
            # Only reached early if the task is cancelled (event loop shutting down).
            while self._pending:
                self._fail(self._pending.popleft(), StoreError("the group committer stopped"))

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        size = 0
        while self._pending:
            request = self._pending[0]
            if request.future.done():  # the caller gave up while queued
                self._pending.popleft()
                continue
            if batch and size + len(request.events) > self._max_batch:
                break
            batch.append(self._pending.popleft())
            size += len(request.events)
        return batch

    async def _commit(self, batch: list[_Request]) -> None:
        """Write `batch`, retrying without whoever made it fail, until all are answered."""
        while batch:
            culprits: list[_Request] = []
            try:
                entries = await asyncio.to_thread(self._write, batch, culprits)
            except Exception as exc:
                batch = await self._after_failure(batch, culprits, exc)
                continue
            except BaseException:  # cancelled (loop shutting down), or worse: no one waits
                for request in batch:
                    self._fail(request, StoreError(
                        "the group committer stopped while writing; the entries may or "
                        "may not have been appended"
                    ))  # fmt: skip
                raise
            self.transactions += 1
            self.appended += len(entries)
            offset = 0
            for request in batch:
                count = len(request.events)
                if not request.future.done():
                    request.future.set_result(entries[offset : offset + count])
                offset += count
            return

    def _write(self, batch: list[_Request], culprits: list[_Request]) -> list[Entry]:
        """Runs in a worker thread: one transaction for the whole batch."""
        events = [event for request in batch for event in request.events]
        if all(request.apply is None for request in batch):
            return self._store.append_many(events)

        def apply_each(conn: Connection, entries: list[Entry]) -> None:
            offset = 0
            for request in batch:
                count = len(request.events)
                if request.apply is not None:
                    try:
                        request.apply(conn, entries[offset : offset + count])
                    except Exception:
                        culprits.append(request)
                        raise
                offset += count

        return self._store.append_many(events, apply_each)

    async def _after_failure(
        self, batch: list[_Request], culprits: list[_Request], exc: Exception
    ) -> list[_Request]:
        """Answer the callers a failure belongs to; return the batch still to write."""
        if culprits:  # a caller's own apply refused its events
            self._fail(culprits[0], exc)
            return [r for r in batch if r is not culprits[0]]
        if len(batch) == 1:
            self._fail(batch[0], exc)
            return []
        if isinstance(exc, StoreError):  # the storage failed: nobody's event
            for request in batch:
                shared = StoreError(str(exc))
                shared.__cause__ = exc
                self._fail(request, shared)
            return []
        if isinstance(exc, EntryError):  # an event that does not encode
            bad = {id(r): p for r in batch if (p := _encoding_problem(r)) is not None}
            for request in batch:
                if id(request) in bad:
                    self._fail(request, bad[id(request)])
            if bad:
                return [r for r in batch if id(r) not in bad]
        # Cannot tell whose fault it was: write each caller alone.
        for request in batch:
            await self._commit([request])
        return []

    @staticmethod
    def _fail(request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)

"""The hub's single ledger writer.

Every append of the hub goes through one `LedgerWriter`: operator commands (the
router), the rollout controller and report intake. A writer holds `lock` while it
judges the state and appends, so state checks and the append see the same state; the
events and their fold into the hub's tables (hub.fold.apply_entries) commit in one
transaction. After the commit each entry goes to the `ledger.entry` feed, if the hub is
serving one.

With several hub processes on one PostgreSQL (hub.commands.leadership) the lock is also
held across processes, and an append of leader-only work (`leader=True`: the rollout
controller, reconciliation, report intake) is fenced: refused inside its own
transaction unless this process's epoch is the newest leader's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from sqlalchemy import Connection

from edge_agent.protocol.names import LEDGER_ENTRY_SUBJECT
from hub import fold
from hub.commands.leadership import Fenced, Leadership, WriteLock
from ledger.entry import Entry
from ledger.storage import query
from ledger.storage.store import ApplyCallback, LedgerStore, NewEvent

T = TypeVar("T")

# publish(subject, data, headers): the NATS edge's, without waiting for an ack.
Publish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]
# on_append(entries, seconds): one append's size and how long its transaction took.
AppendObserver = Callable[[int, float], None]


def entry_headers(entry: Entry) -> dict[str, str]:
    return {"Nats-Msg-Id": f"ledger.{entry.seq}", "Ledger-Seq": str(entry.seq),
            "Ledger-Hash": entry.hash.hex(), "Ledger-Prev": entry.prev.hex()}


class LedgerWriter:
    def __init__(self, store: LedgerStore, stalled_after_s: float = 10.0) -> None:
        self.store = store
        # One writer at a time, in this process and (PostgreSQL) across processes.
        self.lock = WriteLock(store.engine, stalled_after_s)
        # Who leads; None: this writer is alone (offline use, tests): it always leads.
        self.leadership: Leadership | None = None
        self.publish: Publish | None = None  # set while the hub serves the feed
        self.on_append: AppendObserver | None = None  # the metrics' latency histogram

    async def append(self, new: Sequence[NewEvent], *, leader: bool = False) -> list[Entry]:
        """Append `new` with their fold, in one transaction; the caller holds `lock`.
        `leader`: leader-only work, refused (`Fenced`) unless this process leads."""
        assert self.lock.locked(), "LedgerWriter.append needs the write lock held"
        started = time.perf_counter()
        apply: ApplyCallback = fold.apply_entries
        leadership = self.leadership if leader else None
        if leadership is not None:
            epoch = leadership.check()
            fenced = leadership

            def apply(conn: Connection, entries: list[Entry]) -> None:
                fenced.fence_in(conn, epoch)  # after the insert: under the chain-head lock
                fold.apply_entries(conn, entries)
        try:
            entries = self.store.append_many(list(new), apply=apply)
        except Fenced as exc:
            raise exc if leadership is None else leadership.refused(exc) from None
        if leadership is not None and entries:
            leadership.last_leader_seq = entries[-1].seq
        if self.on_append is not None:
            self.on_append(len(entries), time.perf_counter() - started)
        if self.publish is None:
            return entries  # not serving (offline use): no feed to publish to
        # The feed is a convenience; the DB is truth. Published in order on the hub's one
        # connection (the LEDGER stream stores them in that order, de-duplicated by
        # Nats-Msg-Id) without waiting for each stream ack: waiting would hold the write
        # lock for one NATS round trip per entry, and a failed publish is ignored anyway.
        for entry in entries:
            with contextlib.suppress(Exception):
                await self.publish(LEDGER_ENTRY_SUBJECT, entry.body, entry_headers(entry))
        return entries

    async def write(self, new: Sequence[NewEvent], *, leader: bool = False) -> list[Entry]:
        """`append` under the lock, for a caller that judged no state first."""
        async with self.lock:
            return await self.append(new, leader=leader)

    def read(self, fn: Callable[[Connection], T]) -> T:
        with self.store.engine.connect() as conn:
            return fn(conn)

    def head_seq(self) -> int | None:
        """The seq of the newest entry (None: the ledger is empty)."""
        return self.read(query.head_seq)


def next_seq(conn: Connection) -> int:
    """The seq the next appended entry will get (names deployments and rollouts)."""
    head = query.head_seq(conn)
    return 0 if head is None else head + 1

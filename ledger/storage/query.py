"""Reading entries by their indexed columns: kind, subject prefix, actor, time range.

Used by `ledger query` and `ledger tail`. Filters run in the database on the stored
columns (`kind` and `subject` are indexed); the results are decoded entries. This reads
and does not verify: `ledger verify` checks that the columns match the bodies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.exc import SQLAlchemyError

from ledger.entry import Entry
from ledger.errors import EntryError, StoreError
from ledger.storage.schema import ENTRIES
from ledger.storage.store import LedgerStore


@dataclass(frozen=True)
class EntryFilter:
    kinds: Sequence[str] = ()
    subject_prefix: str | None = None
    actor: str | None = None
    since_ns: int | None = None  # ts >= since
    until_ns: int | None = None  # ts < until
    after_seq: int | None = None  # seq > after_seq

    def where(self) -> list[ColumnElement[bool]]:
        c = ENTRIES.c
        conds: list[ColumnElement[bool]] = []
        if self.kinds:
            conds.append(c.kind.in_(list(self.kinds)))
        if self.subject_prefix:
            conds.append(c.subject.startswith(self.subject_prefix, autoescape=True))
        if self.actor is not None:
            conds.append(c.actor == self.actor)
        if self.since_ns is not None:
            conds.append(c.ts >= self.since_ns)
        if self.until_ns is not None:
            conds.append(c.ts < self.until_ns)
        if self.after_seq is not None:
            conds.append(c.seq > self.after_seq)
        return conds


def query_entries(
    store: LedgerStore, flt: EntryFilter, limit: int = 100, newest: bool = False
) -> list[Entry]:
    """Entries matching `flt` in seq order: the first `limit`, or the last `limit` when
    `newest`."""
    order = ENTRIES.c.seq.desc() if newest else ENTRIES.c.seq
    stmt: Select[Any] = (select(ENTRIES.c.seq, ENTRIES.c.body, ENTRIES.c.prev, ENTRIES.c.hash)
                         .where(*flt.where()).order_by(order).limit(limit))
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(stmt).all()
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read {store.location}: {exc}") from exc
    out = []
    for row in rows:
        try:
            out.append(Entry.from_body(bytes(row.body), bytes(row.prev), bytes(row.hash)))
        except EntryError as exc:
            raise EntryError(f"stored entry seq {row.seq} cannot be read: {exc}") from exc
    return out[::-1] if newest else out

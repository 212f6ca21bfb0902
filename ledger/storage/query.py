"""Reading entries by their indexed columns: kind, subject, actor, time range, seq range.

Used by `ledger query` and `ledger tail`, and by the hub for everything it reads back
from its own ledger (a subject's history, the newest entry of a kind, the head). The
functions take a SQLAlchemy `Connection`, so a caller reads entries in the same
transaction as its own tables; `query_entries` is the store-taking convenience of the
CLI. Filters run in the database on the stored columns (`kind` and `subject` are
indexed); the results are decoded entries. This reads and does not verify: `ledger
verify` checks that the columns match the bodies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from ledger.entry import Entry
from ledger.errors import EntryError, StoreError
from ledger.storage.schema import ENTRIES
from ledger.storage.store import LedgerStore


@dataclass(frozen=True)
class EntryFilter:
    kinds: Sequence[str] = ()  # kind is one of these (or has one of `kind_prefixes`)
    subject_prefix: str | None = None
    actor: str | None = None
    since_ns: int | None = None  # ts >= since
    until_ns: int | None = None  # ts < until
    after_seq: int | None = None  # seq > after_seq
    subject: str | None = None  # subject == this
    before_seq: int | None = None  # seq < before_seq
    kind_prefixes: Sequence[str] = ()  # kind starts with one of these (or is in `kinds`)

    def where(self) -> list[ColumnElement[bool]]:
        c = ENTRIES.c
        conds: list[ColumnElement[bool]] = []
        kind: list[ColumnElement[bool]] = [c.kind.in_(list(self.kinds))] if self.kinds else []
        kind += [c.kind.startswith(p, autoescape=True) for p in self.kind_prefixes]
        if kind:
            conds.append(or_(*kind))
        if self.subject_prefix:
            conds.append(c.subject.startswith(self.subject_prefix, autoescape=True))
        if self.subject is not None:
            conds.append(c.subject == self.subject)
        if self.actor is not None:
            conds.append(c.actor == self.actor)
        if self.since_ns is not None:
            conds.append(c.ts >= self.since_ns)
        if self.until_ns is not None:
            conds.append(c.ts < self.until_ns)
        if self.after_seq is not None:
            conds.append(c.seq > self.after_seq)
        if self.before_seq is not None:
            conds.append(c.seq < self.before_seq)
        return conds


def _statement(flt: EntryFilter, limit: int | None, newest: bool) -> Select[Any]:
    order = ENTRIES.c.seq.desc() if newest else ENTRIES.c.seq
    stmt: Select[Any] = (select(ENTRIES.c.seq, ENTRIES.c.body, ENTRIES.c.prev, ENTRIES.c.hash)
                         .where(*flt.where()).order_by(order))
    return stmt if limit is None else stmt.limit(limit)


def _decode(row: Any) -> Entry:
    try:
        return Entry.from_body(bytes(row.body), bytes(row.prev), bytes(row.hash))
    except EntryError as exc:
        raise EntryError(f"stored entry seq {row.seq} cannot be read: {exc}") from exc


def iter_entries(conn: Connection, flt: EntryFilter) -> Iterator[Entry]:
    """Every entry matching `flt`, in seq order."""
    for row in conn.execute(_statement(flt, None, False)):
        yield _decode(row)


def select_entries(conn: Connection, flt: EntryFilter, limit: int | None = 100,
                   newest: bool = False) -> list[Entry]:
    """Entries matching `flt` in seq order: the first `limit`, or the last `limit` when
    `newest` (None: all of them)."""
    out = [_decode(row) for row in conn.execute(_statement(flt, limit, newest))]
    return out[::-1] if newest else out


def last_entry(conn: Connection, flt: EntryFilter) -> Entry | None:
    """The newest entry matching `flt`, if any."""
    found = select_entries(conn, flt, 1, newest=True)
    return found[0] if found else None


def any_entry(conn: Connection, flt: EntryFilter) -> bool:
    """Whether some entry matches `flt` (reads one seq, no body)."""
    stmt = select(ENTRIES.c.seq).where(*flt.where()).limit(1)
    return conn.execute(stmt).first() is not None


def head_seq(conn: Connection) -> int | None:
    """The seq of the newest entry (None: the ledger is empty)."""
    head = conn.execute(select(func.max(ENTRIES.c.seq))).scalar()
    return None if head is None else int(head)


def query_entries(
    store: LedgerStore, flt: EntryFilter, limit: int = 100, newest: bool = False
) -> list[Entry]:
    """`select_entries` on a store of its own connection (for `ledger query`/`tail`)."""
    try:
        with store.engine.connect() as conn:
            return select_entries(conn, flt, limit, newest)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read {store.location}: {exc}") from exc

"""The ledger's storage: an append-only SQL table, SQLite (WAL) or PostgreSQL.

This is the only ledger module that touches a database. The hot append path uses
SQLAlchemy Core; the tables are declared with SQLModel so the hub can keep its
projection tables (same metadata style) in the same database and update them in the
same transaction as the append, through the `apply` callback.

One writer at a time is enforced by the database, not by this process: SQLite takes
its write lock at `BEGIN IMMEDIATE` (so the head we read cannot move under us), and
PostgreSQL takes a self-conflicting table lock. The primary key on `seq` is the
backstop: two appends can never both write the same seq.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    LargeBinary,
    Row,
    Select,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, SQLModel

from ledger.entry import GENESIS_PREV, Entry, build_entry
from ledger.errors import EntryError, LedgerNotFoundError, StoreError
from ledger.verify import RawRow, VerifyResult, verify_chain

FORMAT = "fleetledger-ledger/1"
HASH_NAME = "blake3"
DEFAULT_BUSY_TIMEOUT_MS = 30_000
APPEND_ONLY_MESSAGE = "ledger entries are append-only"
# Connection execution option that makes the SQLite "begin" hook take the write lock.
_WRITE_TXN_OPTION = "fleetledger_write"


class LedgerEntryRow(SQLModel, table=True):
    __tablename__ = "ledger_entries"

    # Not autoincrement: seq is chosen by the appender from the head it read under
    # the write lock (and PostgreSQL must not attach a sequence to it).
    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    ts: int = Field(sa_type=BigInteger)
    kind: str = Field(sa_type=Text, index=True)
    actor: str = Field(sa_type=Text)
    subject: str = Field(sa_type=Text, index=True)
    body: bytes = Field(sa_type=LargeBinary)
    prev: bytes = Field(sa_type=LargeBinary)
    hash: bytes = Field(sa_type=LargeBinary)


class LedgerMetaRow(SQLModel, table=True):
    __tablename__ = "ledger_meta"

    key: str = Field(sa_type=Text, primary_key=True)
    value: str = Field(sa_type=Text)


ENTRIES: Table = SQLModel.metadata.tables["ledger_entries"]
META: Table = SQLModel.metadata.tables["ledger_meta"]
_ROW_COLUMNS = (
    ENTRIES.c.seq,
    ENTRIES.c.ts,
    ENTRIES.c.kind,
    ENTRIES.c.actor,
    ENTRIES.c.subject,
    ENTRIES.c.body,
    ENTRIES.c.prev,
    ENTRIES.c.hash,
)

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER IF NOT EXISTS ledger_entries_no_{verb.lower()}
        BEFORE {verb} ON ledger_entries
        BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"""
    for verb in ("UPDATE", "DELETE")
]
_POSTGRES_TRIGGERS = [
    f"""CREATE OR REPLACE FUNCTION ledger_entries_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}'; END $$""",
    """CREATE OR REPLACE TRIGGER ledger_entries_no_change
        BEFORE UPDATE OR DELETE ON ledger_entries
        FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()""",
    """CREATE OR REPLACE TRIGGER ledger_entries_no_truncate
        BEFORE TRUNCATE ON ledger_entries
        FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only()""",
]

ApplyCallback = Callable[[Connection, list[Entry]], None]


@dataclass(frozen=True)
class NewEvent:
    """An event to append; seq, prev and hash are assigned by the store."""

    kind: str
    actor: str
    subject: str
    payload: dict[str, Any] = field(hash=False)
    ts: int | None = None


def _to_url(location: str | Path) -> URL:
    if isinstance(location, str) and location.startswith(("sqlite:", "postgresql")):
        try:
            return make_url(location)
        except ArgumentError as exc:
            raise StoreError(f"{location!r} is not a valid database URL: {exc}") from exc
    return URL.create("sqlite+pysqlite", database=str(Path(location)))


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so the "begin" hook below decides
        # how each transaction starts (the pattern from the SQLAlchemy SQLite docs).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed append survives power loss, not only a process crash.
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers lock at BEGIN, so the head they read is still the head when they
        # insert; readers stay deferred and never block a writer in WAL mode.
        write = conn.get_execution_options().get(_WRITE_TXN_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _raw(row: Row[Any]) -> RawRow:
    # PostgreSQL drivers return memoryview for bytea; the verifier compares bytes.
    return RawRow(
        row.seq, row.ts, row.kind, row.actor, row.subject,
        bytes(row.body), bytes(row.prev), bytes(row.hash),
    )  # fmt: skip


def _entry(row: Row[Any]) -> Entry:
    try:
        return Entry.from_body(bytes(row.body), bytes(row.prev), bytes(row.hash))
    except EntryError as exc:
        raise EntryError(f"stored entry seq {row.seq} cannot be read: {exc}") from exc


class LedgerStore:
    """An open ledger database. Use `LedgerStore.open(...)`; close it when done."""

    def __init__(self, engine: Engine, where: str) -> None:
        self._engine = engine
        self._where = where

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str | Path,
        *,
        create: bool = True,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> LedgerStore:
        """Open the ledger at a filesystem path (SQLite) or a SQLAlchemy URL starting
        with `sqlite:` or `postgresql`. With `create=False` a missing database raises
        `LedgerNotFoundError` instead of being created (what an auditor wants)."""
        url = _to_url(location)
        where = url.render_as_string(hide_password=True)
        sqlite = url.get_backend_name() == "sqlite"
        if sqlite and not _is_memory(url):
            db_file = Path(str(url.database))
            where = str(db_file)
            if not db_file.exists():
                if not create:
                    raise LedgerNotFoundError(f"no ledger database at {db_file}")
                db_file.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if sqlite and _is_memory(url):
            kwargs["poolclass"] = StaticPool  # one shared connection, else one db each
        try:
            engine = create_engine(url, **kwargs)
        except (ImportError, ArgumentError) as exc:
            raise StoreError(
                f"cannot open {where}: {exc} (for PostgreSQL install a driver, e.g. "
                "psycopg, and use a postgresql+psycopg:// URL)"
            ) from exc
        if sqlite:
            _install_sqlite_hooks(engine, busy_timeout_ms)
        store = cls(engine, where)
        try:
            store._prepare(create)
        except BaseException:
            engine.dispose()
            raise
        return store

    def _prepare(self, create: bool) -> None:
        try:
            if create:
                with self._write_transaction() as conn:
                    self._create_schema(conn)
            if not inspect(self._engine).has_table(META.name):
                raise StoreError(f"{self._where} is not a fleetledger ledger (no ledger_meta)")
            with self._engine.connect() as conn:
                rows = conn.execute(select(META.c.key, META.c.value)).all()
            meta = {str(row.key): str(row.value) for row in rows}
        except SQLAlchemyError as exc:
            raise self._error("open", exc) from exc
        if meta.get("format") != FORMAT or meta.get("hash") != HASH_NAME:
            raise StoreError(
                f"{self._where} holds format={meta.get('format')!r} hash={meta.get('hash')!r}; "
                f"this version reads only format={FORMAT!r} hash={HASH_NAME!r}"
            )

    def _create_schema(self, conn: Connection) -> None:
        SQLModel.metadata.create_all(conn, tables=[ENTRIES, META])
        dialect = conn.dialect.name
        triggers = _SQLITE_TRIGGERS if dialect == "sqlite" else _POSTGRES_TRIGGERS
        if dialect in ("sqlite", "postgresql"):
            for ddl in triggers:
                conn.exec_driver_sql(ddl)
        present = set(conn.execute(select(META.c.key)).scalars())
        wanted = {"format": FORMAT, "hash": HASH_NAME}
        rows = [{"key": k, "value": v} for k, v in wanted.items() if k not in present]
        if rows:
            conn.execute(insert(META), rows)

    # -- transactions and errors -------------------------------------------------------

    def _error(self, action: str, exc: SQLAlchemyError) -> StoreError:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        if isinstance(exc, OperationalError) and "locked" in detail:
            return StoreError(
                f"cannot {action} ledger {self._where}: the database stayed locked by "
                f"another writer longer than the busy timeout ({detail})"
            )
        return StoreError(f"cannot {action} ledger {self._where}: {detail}")

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        """One write transaction holding the database's writer lock. Errors raised by
        the body (e.g. the caller's `apply`) roll back and propagate unchanged."""
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            raise self._error("connect to", exc) from exc
        try:
            conn.execution_options(**{_WRITE_TXN_OPTION: True})
            try:
                txn = conn.begin()
                if conn.dialect.name == "postgresql":
                    # Conflicts with itself, not with readers: one appender at a time.
                    conn.exec_driver_sql(
                        "LOCK TABLE ledger_entries IN SHARE ROW EXCLUSIVE MODE"
                    )
            except SQLAlchemyError as exc:
                raise self._error("lock", exc) from exc
            try:
                yield conn
            except BaseException:
                txn.rollback()
                raise
            try:
                txn.commit()
            except SQLAlchemyError as exc:
                raise self._error("commit to", exc) from exc
        finally:
            conn.close()

    def _fetch(self, stmt: Select[Any]) -> list[Row[Any]]:
        try:
            with self._engine.connect() as conn:
                return list(conn.execute(stmt).all())
        except SQLAlchemyError as exc:
            raise self._error("read", exc) from exc

    # -- appending ---------------------------------------------------------------------

    def append(
        self,
        kind: str,
        actor: str,
        subject: str,
        payload: dict[str, Any],
        ts: int | None = None,
        apply: ApplyCallback | None = None,
    ) -> Entry:
        """Append one entry; see `append_many`."""
        return self.append_many([NewEvent(kind, actor, subject, payload, ts)], apply)[0]

    def append_many(
        self, events: Sequence[NewEvent], apply: ApplyCallback | None = None
    ) -> list[Entry]:
        """Append `events` in order, atomically, chained on the current head.

        `apply(conn, entries)` runs inside the same transaction after the insert, so
        projections change together with the ledger; if it raises, nothing is appended
        and its exception propagates. A missing `ts` is the hub clock, UTC ns.
        """
        if not events:
            return []
        with self._write_transaction() as conn:
            entries = self._insert_chained(conn, events)
            if apply is not None:
                apply(conn, entries)
        return entries

    def _insert_chained(self, conn: Connection, events: Sequence[NewEvent]) -> list[Entry]:
        try:
            head = conn.execute(
                select(ENTRIES.c.seq, ENTRIES.c.hash).order_by(ENTRIES.c.seq.desc()).limit(1)
            ).first()
        except SQLAlchemyError as exc:
            raise self._error("read the head of", exc) from exc
        seq, prev = (head.seq + 1, bytes(head.hash)) if head is not None else (0, GENESIS_PREV)
        entries: list[Entry] = []
        for ev in events:
            ts = ev.ts if ev.ts is not None else time.time_ns()
            entry = build_entry(seq, prev, ts, ev.kind, ev.actor, ev.subject, ev.payload)
            entries.append(entry)
            seq, prev = seq + 1, entry.hash
        rows = [
            {
                "seq": e.seq, "ts": e.ts, "kind": e.kind, "actor": e.actor,
                "subject": e.subject, "body": e.body, "prev": e.prev, "hash": e.hash,
            }
            for e in entries
        ]  # fmt: skip
        try:
            conn.execute(insert(ENTRIES), rows)
        except IntegrityError as exc:
            raise StoreError(
                f"cannot append to ledger {self._where}: seq {entries[0].seq} was taken "
                "by another writer (the database did not serialise appends)"
            ) from exc
        except SQLAlchemyError as exc:
            raise self._error("append to", exc) from exc
        return entries

    # -- reading -----------------------------------------------------------------------

    def head(self) -> Entry | None:
        """The last entry, or None for an empty ledger."""
        rows = self._fetch(select(*_ROW_COLUMNS).order_by(ENTRIES.c.seq.desc()).limit(1))
        return _entry(rows[0]) if rows else None

    def count(self) -> int:
        """The number of stored entries."""
        rows = self._fetch(select(func.count()).select_from(ENTRIES))
        return int(rows[0][0])

    def get(self, seq: int) -> Entry | None:
        rows = self._fetch(select(*_ROW_COLUMNS).where(ENTRIES.c.seq == seq))
        return _entry(rows[0]) if rows else None

    def tail(self, n: int) -> list[Entry]:
        """The last `n` entries, oldest first."""
        if n <= 0:
            return []
        rows = self._fetch(select(*_ROW_COLUMNS).order_by(ENTRIES.c.seq.desc()).limit(n))
        return [_entry(r) for r in reversed(rows)]

    def _iter_rows(self, start: int, batch: int) -> Iterator[Row[Any]]:
        # Keyset pagination: one short read per batch, so memory stays O(batch) and no
        # read transaction is held open across the whole scan (which would stall WAL
        # checkpoints on a long audit).
        if batch <= 0:
            raise ValueError("batch must be positive")
        after = start - 1
        while True:
            stmt = (
                select(*_ROW_COLUMNS)
                .where(ENTRIES.c.seq > after)
                .order_by(ENTRIES.c.seq)
                .limit(batch)
            )
            rows = self._fetch(stmt)
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].seq

    def iter_entries(self, start: int = 0, batch: int = 1000) -> Iterator[Entry]:
        """Decoded entries from seq `start` on, in seq order."""
        for row in self._iter_rows(start, batch):
            yield _entry(row)

    def iter_raw(self, batch: int = 1000) -> Iterator[RawRow]:
        """Every stored row, undecoded, in seq order (what verification reads)."""
        for row in self._iter_rows(0, batch):
            yield _raw(row)

    def verify(self, expected_head: tuple[int, bytes] | None = None) -> VerifyResult:
        """Verify the whole stored chain; see `ledger.verify.verify_chain`."""
        return verify_chain(self.iter_raw(), expected_head)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for projection tables kept in the same database."""
        return self._engine

    @property
    def location(self) -> str:
        """Where the ledger lives (file path, or URL without password)."""
        return self._where

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

"""Driver-level SQL for the ledger store: URLs, SQLite tuning, the statements of the hot
append and tree-read paths run on the driver's cursor, and database errors mapped to
`StoreError`.

Everything here is below `LedgerStore` and the tile tree (ledger/storage/tree.py); it
knows the table names (ledger/storage/schema.py) but nothing about entries or proofs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError

from ledger.errors import StoreError

DEFAULT_BUSY_TIMEOUT_MS = 30_000
# SQLite durability (WAL mode): FULL fsyncs the WAL at every commit, NORMAL only at
# checkpoints (see docs/ARCHITECTURE.md, "Ledger and state"). PostgreSQL ignores it.
Synchronous = Literal["FULL", "NORMAL"]
DEFAULT_SYNCHRONOUS: Synchronous = "FULL"
# SQLite page cache per connection, KiB (see install_sqlite_hooks).
_SQLITE_CACHE_KIB = 64 * 1024
# Page size of a new SQLite ledger. 16 KiB rather than SQLite's 4 KiB: B-trees one level
# shallower, so a proof from a cold file reads fewer pages (1.5 vs 1.9-2.0 ms at 200,000
# entries here); batched appends ~20% faster; one-commit appends about the same (each
# commit writes larger WAL frames, but fewer). 64 KiB made lone appends 40% slower.
_SQLITE_PAGE_SIZE = 16384
# Any constant: PostgreSQL openers serialise schema creation on this advisory lock.
PG_SCHEMA_LOCK_KEY = 0x666C656574  # "fleet"
# Connection execution option that makes the SQLite "begin" hook take the write lock.
WRITE_TXN_OPTION = "fleetledger_write"

# The append path runs these through the driver's own executemany with plain tuples
# (`run_driver`): several times cheaper per row than insert(TABLE) with parameter dicts,
# which pays SQLAlchemy's per-row bind processing.
ENTRY_INSERT = (
    "INSERT INTO ledger_entries (seq, ts, kind, actor, subject, body, prev, hash) "
    "VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m}, {m})"
)
TILE_INSERT = "INSERT INTO ledger_tiles (level, idx, hashes) VALUES ({m}, {m}, {m})"
TILE_EXTEND = "UPDATE ledger_tiles SET hashes = {m} WHERE level = {m} AND idx = {m}"
HEAD_SQL = "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1"
TREE_SIZE_SQL = (
    "SELECT idx, length(hashes) FROM ledger_tiles WHERE level = 0 ORDER BY idx DESC LIMIT 1"
)


def to_url(location: str | Path) -> URL:
    """The SQLAlchemy URL of a ledger: a `sqlite:`/`postgresql` URL, else a SQLite file."""
    if isinstance(location, str) and location.startswith(("sqlite:", "postgresql")):
        try:
            return make_url(location)
        except ArgumentError as exc:
            raise StoreError(f"{location!r} is not a valid database URL: {exc}") from exc
    return URL.create("sqlite+pysqlite", database=str(Path(location)))


def is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def install_sqlite_hooks(engine: Engine, busy_timeout_ms: int, synchronous: Synchronous) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so the "begin" hook below decides
        # how each transaction starts (the pattern from the SQLAlchemy SQLite docs).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute(f"PRAGMA page_size = {_SQLITE_PAGE_SIZE}")  # new files only
            cursor.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed append survives power loss, not only a process crash.
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            # The subject index takes each append at a different place: once it outgrows
            # SQLite's default 2 MiB page cache, every append re-reads index pages from
            # the OS (~3x slower appends at 1 M entries). Pages are allocated as used.
            cursor.execute(f"PRAGMA cache_size = -{_SQLITE_CACHE_KIB}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers lock at BEGIN, so the head they read is still the head when they
        # insert; readers stay deferred and never block a writer in WAL mode.
        write = conn.get_execution_options().get(WRITE_TXN_OPTION, False)
        run_driver(conn, "BEGIN IMMEDIATE" if write else "BEGIN").close()


def run_driver(conn: Connection, sql: str, params: Any = (), *, many: bool = False) -> Any:
    """Run one of our own statements on the driver's cursor, inside `conn`'s transaction,
    and return the cursor (the caller closes it). This skips SQLAlchemy's per-statement
    machinery, ~40 µs a statement: for a single append's four statements, as much as
    SQLite's own work short of the commit. Driver errors are raised wrapped as
    SQLAlchemy's (IntegrityError, OperationalError, ...), as exec_driver_sql would."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        cursor.close()
        raise DBAPIError.instance(
            sql, None, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
        ) from exc
    return cursor


def insert_sql(conn: Connection, template: str) -> str:
    """`template` with its `{m}` parameter marks in the driver's style."""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"  # sqlite3 | psycopg, pg8000
    return template.format(m=mark)


def tiles_sql(conditions: Iterable[str]) -> str:
    """One statement reading the tiles that match any of `conditions` (each over the
    primary key): a UNION ALL of index lookups. SQLite plans one large OR slowly
    (~0.4 ms for 20 lookups, 20x the lookups themselves)."""
    return " UNION ALL ".join(
        f"SELECT level, idx, hashes FROM ledger_tiles WHERE {c}" for c in conditions
    )


def store_error(where: str, action: str, exc: SQLAlchemyError) -> StoreError:
    """A database error as the `StoreError` a person can act on ("cannot read ledger X")."""
    detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    if isinstance(exc, OperationalError) and "locked" in detail:
        return StoreError(
            f"cannot {action} ledger {where}: the database stayed locked by "
            f"another writer longer than the busy timeout ({detail})"
        )
    return StoreError(f"cannot {action} ledger {where}: {detail}")


def read_driver(engine: Engine, where: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """The rows of one read, unpackable like tuples; bytes columns as bytes (some
    PostgreSQL drivers give memoryview)."""
    try:
        with engine.connect() as conn:
            rows: list[Any] = list(conn.exec_driver_sql(sql, params).fetchall())
    except SQLAlchemyError as exc:
        raise store_error(where, "read", exc) from exc
    if rows and any(isinstance(v, memoryview) for v in rows[0]):
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]
    return rows

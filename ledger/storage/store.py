"""The ledger's storage: an append-only SQL table, SQLite (WAL) or PostgreSQL.

This is the only ledger module that touches a database. The hot append path uses
SQLAlchemy Core; the tables are declared with SQLModel so the hub can keep its
projection tables (same metadata style) in the same database and update them in the
same transaction as the append, through the `apply` callback.

One writer at a time is enforced by the database, not by this process: SQLite takes
its write lock at `BEGIN IMMEDIATE` (so the head we read cannot move under us), and
PostgreSQL takes a self-conflicting table lock. The primary key on `seq` is the
backstop: two appends can never both write the same seq.

The Merkle tree (RFC 9162, ledger/merkle.py) is stored beside the entries as tiles
(`ledger_tiles`, ledger/tiles.py): the hashes of every 4th level, 16 to a row. Each
append computes the new leaves and the nodes they complete from the O(log n) subtree
hashes on the tree's right edge, and in the same transaction inserts the tiles they
start and extends the partial ones, so any root or proof later needs only
O(log n / 4) row reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import blake3
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Integer,
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
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, SQLModel

from ledger.entry import CHAIN_DOMAIN, GENESIS_PREV, HASH_NAME, Entry, encode_body
from ledger.errors import EntryError, LedgerNotFoundError, StoreError, TreeRangeError
from ledger.merkle import (
    BLAKE3,
    DEFAULT_TREE_HASH,
    HASHES,
    LEAF_PREFIX,
    GetNode,
    MerkleFrontier,
    TreeHash,
    consistency_proof,
    frontier_coordinates,
    inclusion_proof,
    root_at,
)
from ledger.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    edge_tiles,
    group_by_tile,
    hash_up,
    locate,
    split_hashes,
)
from ledger.verify import (
    MERKLE_TREE_MISMATCH,
    RawRow,
    StoredRow,
    TreeCheck,
    TreeRow,
    VerifyResult,
    VerifyStart,
    verify_chain,
)

# /2: the Merkle tree is stored as tiles (ledger_tiles), not one row per node.
FORMAT = "fleetledger-ledger/2"
DEFAULT_BUSY_TIMEOUT_MS = 30_000
# SQLite durability (WAL mode): FULL fsyncs the WAL at every commit, NORMAL only at
# checkpoints (see docs/ARCHITECTURE.md, "Ledger and state"). PostgreSQL ignores it.
Synchronous = Literal["FULL", "NORMAL"]
DEFAULT_SYNCHRONOUS: Synchronous = "FULL"
# SQLite page cache per connection, KiB (see _install_sqlite_hooks).
_SQLITE_CACHE_KIB = 64 * 1024
# Page size of a new SQLite ledger. 16 KiB rather than SQLite's 4 KiB: B-trees one level
# shallower, so a proof from a cold file reads fewer pages (1.5 vs 1.9-2.0 ms at 200,000
# entries here); batched appends ~20% faster; one-commit appends about the same (each
# commit writes larger WAL frames, but fewer). 64 KiB made lone appends 40% slower.
_SQLITE_PAGE_SIZE = 16384
# Any constant: PostgreSQL openers serialise schema creation on this advisory lock.
_PG_SCHEMA_LOCK_KEY = 0x666C656574  # "fleet"
APPEND_ONLY_MESSAGE = "ledger entries are append-only"
TREE_APPEND_ONLY_MESSAGE = "ledger Merkle tree tiles are append-only (they may only grow)"
# Connection execution option that makes the SQLite "begin" hook take the write lock.
_WRITE_TXN_OPTION = "fleetledger_write"


class LedgerEntryRow(SQLModel, table=True):
    __tablename__ = "ledger_entries"

    # Not autoincrement: seq is chosen by the appender from the head it read under
    # the write lock (and PostgreSQL must not attach a sequence to it). 64-bit like ts;
    # SQLite keeps INTEGER, its rowid alias (BIGINT there would add a second index).
    seq: int = Field(
        primary_key=True,
        sa_type=BigInteger().with_variant(Integer(), "sqlite"),
        sa_column_kwargs={"autoincrement": False},
    )
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


class _Digest(LargeBinary):
    """A hash column: bytes go to the driver as they are. (LargeBinary's bind processor
    costs about as much as the insert itself on the append path; results are still
    converted to bytes.)"""

    cache_ok = True

    def bind_processor(self, dialect: Any) -> None:
        return None


class LedgerTileRow(SQLModel, table=True):
    """One tile of the Merkle tree (ledger/tiles.py): the hashes of the tree nodes
    (4 * level, 16 * idx + j), j = 0 .. width - 1, concatenated; width 1..16."""

    __tablename__ = "ledger_tiles"
    # SQLite: the primary key is the table (no rowid, no second index to maintain).
    __table_args__ = {"sqlite_with_rowid": False}

    level: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    idx: int = Field(
        primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False}
    )
    hashes: bytes = Field(sa_type=_Digest)


ENTRIES: Table = SQLModel.metadata.tables["ledger_entries"]
META: Table = SQLModel.metadata.tables["ledger_meta"]
TILES: Table = SQLModel.metadata.tables["ledger_tiles"]
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

# A tile row may only grow: its stored hashes stay as they are, new ones are appended
# (both tree hashes are 32 bytes, so a full tile is 512 bytes). Anything else is
# refused, like UPDATE and DELETE on entries.
_TILE_FULL_BYTES = TILE_WIDTH * 32
_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER IF NOT EXISTS ledger_entries_no_{verb.lower()}
        BEFORE {verb} ON ledger_entries
        BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"""
    for verb in ("UPDATE", "DELETE")
] + [
    f"""CREATE TRIGGER IF NOT EXISTS ledger_tiles_no_delete
        BEFORE DELETE ON ledger_tiles
        BEGIN SELECT RAISE(ABORT, '{TREE_APPEND_ONLY_MESSAGE}'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS ledger_tiles_only_grow
        BEFORE UPDATE ON ledger_tiles
        WHEN NEW.level IS NOT OLD.level OR NEW.idx IS NOT OLD.idx
          OR typeof(NEW.hashes) != 'blob'
          OR length(NEW.hashes) <= length(OLD.hashes)
          OR length(NEW.hashes) > {_TILE_FULL_BYTES}
          OR substr(NEW.hashes, 1, length(OLD.hashes)) IS NOT OLD.hashes
        BEGIN SELECT RAISE(ABORT, '{TREE_APPEND_ONLY_MESSAGE}'); END""",
]
_POSTGRES_TRIGGERS = [
    # SQLSTATE class 23, like SQLite's RAISE(ABORT): an IntegrityError on both backends.
    f"""CREATE OR REPLACE FUNCTION ledger_entries_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}'
              USING ERRCODE = 'integrity_constraint_violation'; END $$""",
    """CREATE OR REPLACE TRIGGER ledger_entries_no_change
        BEFORE UPDATE OR DELETE ON ledger_entries
        FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()""",
    """CREATE OR REPLACE TRIGGER ledger_entries_no_truncate
        BEFORE TRUNCATE ON ledger_entries
        FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only()""",
    f"""CREATE OR REPLACE FUNCTION ledger_tiles_only_grow() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' AND NEW.level = OLD.level AND NEW.idx = OLD.idx
               AND length(NEW.hashes) > length(OLD.hashes)
               AND length(NEW.hashes) <= {_TILE_FULL_BYTES}
               AND substring(NEW.hashes from 1 for length(OLD.hashes)) = OLD.hashes THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION '{TREE_APPEND_ONLY_MESSAGE}'
                USING ERRCODE = 'integrity_constraint_violation';
        END $$""",
    """CREATE OR REPLACE TRIGGER ledger_tiles_no_change
        BEFORE UPDATE OR DELETE ON ledger_tiles
        FOR EACH ROW EXECUTE FUNCTION ledger_tiles_only_grow()""",
    """CREATE OR REPLACE TRIGGER ledger_tiles_no_truncate
        BEFORE TRUNCATE ON ledger_tiles
        FOR EACH STATEMENT EXECUTE FUNCTION ledger_tiles_only_grow()""",
]
# Tiles are read in one statement; this many (level, idx) pairs at most per statement.
_TREE_READ_CHUNK = 200
_T = TypeVar("_T")

ApplyCallback = Callable[[Connection, list[Entry]], None]


@dataclass(frozen=True)
class NewEvent:
    """An event to append; seq, prev and hash are assigned by the store."""

    kind: str
    actor: str
    subject: str
    payload: dict[str, Any] = field(hash=False)
    ts: int | None = None


TileKey = tuple[int, int]
"""(tile level, tile index) of a `ledger_tiles` row."""


@dataclass(frozen=True)
class _Edge:
    """The tree's right edge after an append: enough to continue without reading it."""

    size: int
    head: bytes  # the hash of entry size - 1 (whose append this describes)
    subtrees: list[bytes]  # MerkleFrontier.subtrees at `size`
    tiles: dict[TileKey, bytes]  # every partial tile at `size`, as stored


def _to_url(location: str | Path) -> URL:
    if isinstance(location, str) and location.startswith(("sqlite:", "postgresql")):
        try:
            return make_url(location)
        except ArgumentError as exc:
            raise StoreError(f"{location!r} is not a valid database URL: {exc}") from exc
    return URL.create("sqlite+pysqlite", database=str(Path(location)))


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int, synchronous: Synchronous) -> None:
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
        write = conn.get_execution_options().get(_WRITE_TXN_OPTION, False)
        _run(conn, "BEGIN IMMEDIATE" if write else "BEGIN").close()


def _run(conn: Connection, sql: str, params: Any = (), *, many: bool = False) -> Any:
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


def _raw(row: Row[Any]) -> RawRow:
    # PostgreSQL drivers return memoryview for bytea; the verifier compares bytes.
    return RawRow(
        row.seq, row.ts, row.kind, row.actor, row.subject,
        bytes(row.body), bytes(row.prev), bytes(row.hash),
    )  # fmt: skip


def _in_range(what: str, value: int, lo: int, hi: int, why: str) -> int:
    """`value` if lo <= value <= hi, else `TreeRangeError` saying why."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TreeRangeError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        bounds = f" (allowed: {lo}..{hi})" if lo <= hi else ""
        raise TreeRangeError(f"{what} {value} is out of range{bounds}: {why}")
    return value


# The append path runs these through the driver's own executemany with plain tuples
# (`_run`): several times cheaper per row than insert(TABLE) with parameter dicts,
# which pays SQLAlchemy's per-row bind processing.
_ENTRY_INSERT = (
    "INSERT INTO ledger_entries (seq, ts, kind, actor, subject, body, prev, hash) "
    "VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m}, {m})"
)
_TILE_INSERT = "INSERT INTO ledger_tiles (level, idx, hashes) VALUES ({m}, {m}, {m})"
_TILE_EXTEND = "UPDATE ledger_tiles SET hashes = {m} WHERE level = {m} AND idx = {m}"
_blake3 = blake3.blake3
_HEAD_SQL = "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1"
_TREE_SIZE_SQL = (
    "SELECT idx, length(hashes) FROM ledger_tiles WHERE level = 0 ORDER BY idx DESC LIMIT 1"
)


def _tiles_sql(conditions: Iterable[str]) -> str:
    """One statement reading the tiles that match any of `conditions` (each over the
    primary key): a UNION ALL of index lookups. SQLite plans one large OR slowly
    (~0.4 ms for 20 lookups, 20x the lookups themselves)."""
    return " UNION ALL ".join(
        f"SELECT level, idx, hashes FROM ledger_tiles WHERE {c}" for c in conditions
    )


def _insert_sql(conn: Connection, template: str) -> str:
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"  # sqlite3 | psycopg, pg8000
    return template.format(m=mark)


def _has(count: int) -> str:
    return f"the ledger has {count} entries" if count else "the ledger is empty"


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
        self._th: TreeHash = BLAKE3  # replaced by what the ledger records, in _prepare
        self._url: str | None = where  # how another process opens it (see open)
        # The right edge after this store's last committed append.
        self._edge: _Edge | None = None

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str | Path,
        *,
        create: bool = True,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        synchronous: Synchronous = DEFAULT_SYNCHRONOUS,
        tree_hash: str | None = None,
    ) -> LedgerStore:
        """Open the ledger at a filesystem path (SQLite) or a SQLAlchemy URL starting
        with `sqlite:` or `postgresql`. With `create=False` a missing database raises
        `LedgerNotFoundError` instead of being created (what an auditor wants).
        `synchronous` is SQLite's durability level: "FULL" (default) or "NORMAL".
        `tree_hash` ("blake3" or "sha256") is the Merkle tree's hash, chosen when the
        ledger is created (default blake3) and recorded in it; an existing ledger always
        uses what it recorded, and naming a different one raises `StoreError`."""
        if tree_hash is not None and tree_hash not in HASHES:
            raise StoreError(
                f"unknown Merkle tree hash {tree_hash!r}; choose one of {', '.join(HASHES)}"
            )
        if synchronous not in get_args(Synchronous):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
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
            _install_sqlite_hooks(engine, busy_timeout_ms, synchronous)
        store = cls(engine, where)
        if not sqlite:
            store._url = url.render_as_string(hide_password=False)
        elif _is_memory(url):
            store._url = None  # no other process can open it
        try:
            store._prepare(create, tree_hash)
        except BaseException:
            engine.dispose()
            raise
        return store

    def _prepare(self, create: bool, tree_hash: str | None = None) -> None:
        try:
            if create:
                with self._write_transaction(schema=True) as conn:
                    self._create_schema(conn, tree_hash)
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
        recorded = meta.get("merkle_hash")
        if recorded not in HASHES:
            raise StoreError(
                f"{self._where} records merkle_hash={recorded!r}; this version needs one of "
                f"{', '.join(HASHES)} (ledgers made before the Merkle tree are not supported)"
            )
        if tree_hash is not None and tree_hash != recorded:
            raise StoreError(
                f"{self._where} was created with Merkle tree hash {recorded!r}; it cannot be "
                f"opened with {tree_hash!r} (the hash is chosen once, when a ledger is created)"
            )
        self._th = HASHES[str(recorded)]

    def _create_schema(self, conn: Connection, tree_hash: str | None = None) -> None:
        SQLModel.metadata.create_all(conn, tables=[ENTRIES, META, TILES])
        dialect = conn.dialect.name
        triggers = _SQLITE_TRIGGERS if dialect == "sqlite" else _POSTGRES_TRIGGERS
        if dialect in ("sqlite", "postgresql"):
            for ddl in triggers:
                conn.exec_driver_sql(ddl)
        present = set(conn.execute(select(META.c.key)).scalars())
        wanted = {"format": FORMAT, "hash": HASH_NAME}
        if "format" not in present:  # a new ledger: its tree hash is chosen now, once
            wanted["merkle_hash"] = tree_hash or DEFAULT_TREE_HASH
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
    def _write_transaction(self, *, schema: bool = False) -> Iterator[Connection]:
        """One write transaction holding the database's writer lock. Errors raised by
        the body (e.g. the caller's `apply`) roll back and propagate unchanged.
        `schema=True`: the tables may not exist yet (PostgreSQL then cannot lock them)."""
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            raise self._error("connect to", exc) from exc
        try:
            conn.execution_options(**{_WRITE_TXN_OPTION: True})
            try:
                txn = conn.begin()
                if conn.dialect.name == "postgresql" and schema:
                    # Concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL.
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK_KEY})")
                elif conn.dialect.name == "postgresql":
                    # Conflicts with itself, not with readers: one appender at a time.
                    _run(conn, "LOCK TABLE ledger_entries IN SHARE ROW EXCLUSIVE MODE").close()
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
            entries, edge = self._insert_chained(conn, events)
            if apply is not None:
                apply(conn, entries)
        # Committed: the next append in this process continues from here without
        # reading the right edge again (it checks the head first; see _right_edge).
        self._edge = edge
        return entries

    def _insert_chained(
        self, conn: Connection, events: Sequence[NewEvent]
    ) -> tuple[list[Entry], _Edge]:
        try:
            cursor = _run(conn, _HEAD_SQL)
            head = cursor.fetchone()
            cursor.close()
        except SQLAlchemyError as exc:
            raise self._error("read the head of", exc) from exc
        seq, prev = (head[0] + 1, bytes(head[1])) if head is not None else (0, GENESIS_PREV)
        if len(prev) != len(GENESIS_PREV):
            raise StoreError(
                f"cannot append to ledger {self._where}: the stored hash of seq {seq - 1} is "
                f"{len(prev)} bytes, not {len(GENESIS_PREV)} (run `ledger verify`)"
            )
        first = seq
        edge = self._right_edge(conn, seq, prev)
        frontier = MerkleFrontier(self._th, seq, edge.subtrees)
        # The hot loop: encode (which validates), chain, and keep the row as a tuple for
        # the driver's executemany; the Entry objects share the same bytes objects.
        rows: list[tuple[int, int, str, str, str, bytes, bytes, bytes]] = []
        leaves: list[bytes] = []
        digest = self._th.digest
        make = Entry._trusted
        now = time.time_ns
        for ev in events:
            ts = ev.ts if ev.ts is not None else now()
            kind, actor, subject = ev.kind, ev.actor, ev.subject
            body = encode_body(seq, ts, kind, actor, subject, ev.payload)
            digest_ = _blake3(CHAIN_DOMAIN + prev + body).digest()  # entry.chain_hash
            rows.append((seq, ts, kind, actor, subject, body, prev, digest_))
            leaves.append(digest(LEAF_PREFIX + body))
            seq, prev = seq + 1, digest_
        # Row order (seq, ts, kind, actor, subject, body, prev, hash) is Entry._trusted's.
        entries = [make(*row) for row in rows]
        inserts, extends, partial = self._tile_writes(edge, frontier.extend(leaves))
        try:
            _run(conn, _insert_sql(conn, _ENTRY_INSERT), rows, many=True).close()
        except IntegrityError as exc:
            raise StoreError(
                f"cannot append to ledger {self._where}: seq {first} was taken "
                "by another writer (the database did not serialise appends)"
            ) from exc
        except SQLAlchemyError as exc:
            raise self._error("append to", exc) from exc
        try:
            if inserts:
                _run(conn, _insert_sql(conn, _TILE_INSERT), inserts, many=True).close()
            if extends:
                _run(conn, _insert_sql(conn, _TILE_EXTEND), extends, many=True).close()
        except IntegrityError as exc:
            raise StoreError(
                f"cannot append to ledger {self._where}: its Merkle tree tiles do not fit "
                f"the entries before seq {first} (run `ledger verify`)"
            ) from exc
        except SQLAlchemyError as exc:
            raise self._error("append to", exc) from exc
        return entries, _Edge(frontier.size, entries[-1].hash, frontier.subtrees, partial)

    def _tile_writes(
        self, edge: _Edge, completed: list[tuple[int, int, bytes]]
    ) -> tuple[list[tuple[int, int, bytes]], list[tuple[bytes, int, int]], dict[TileKey, bytes]]:
        """The tile rows to insert (level, idx, hashes) and to extend (hashes, level,
        idx) for the nodes an append `completed`, and the partial tiles afterwards."""
        full = TILE_WIDTH * self._th.size
        inserts: list[tuple[int, int, bytes]] = []
        extends: list[tuple[bytes, int, int]] = []
        partial = dict(edge.tiles)
        for (level, idx), (start, hashes) in group_by_tile(completed).items():
            blob = b"".join(hashes)
            if start == 0:
                inserts.append((level, idx, blob))
            else:
                # _right_edge read (or kept) every partial tile, at its width.
                blob = partial[(level, idx)] + blob
                extends.append((blob, level, idx))
            if len(blob) < full:
                partial[(level, idx)] = blob
            else:
                partial.pop((level, idx), None)
        return inserts, extends, partial

    def _right_edge(self, conn: Connection, size: int, head_hash: bytes) -> _Edge:
        """The tree's right edge at `size`: kept from this store's last append when the
        head is still the one it wrote, else read from the tiles."""
        edge = self._edge
        if edge is not None and edge.size == size and edge.head == head_hash:
            return edge
        try:
            hsize = self._th.size
            coords = frontier_coordinates(size)
            wanted = {(t.tile_level, t.tile_idx) for t in map(lambda c: locate(*c), coords)}
            partial_widths = {(lv, ix): w for lv, ix, w in edge_tiles(size)}
            tiles = self._read_tiles(conn, wanted | set(partial_widths))
            get = self._tile_getter(tiles)
            subtrees = [get(level, idx) for level, idx in coords]
            partial: dict[TileKey, bytes] = {}
            for key, width in partial_widths.items():
                blob = tiles.get(key, b"")
                if len(blob) != width * hsize:
                    raise StoreError(
                        f"cannot append to ledger {self._where}: Merkle tree tile (level "
                        f"{key[0]}, index {key[1]}) holds {len(blob) // hsize} hashes, the "
                        f"{size} entries need {width} (run `ledger verify`)"
                    )
                partial[key] = blob
        except SQLAlchemyError as exc:
            raise self._error("read the Merkle tree of", exc) from exc
        return _Edge(size, head_hash, subtrees, partial)

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

    def iter_raw(self, batch: int = 1000, start: int = 0) -> Iterator[RawRow]:
        """Every stored row from seq `start` on, undecoded, in seq order (what
        verification reads)."""
        for row in self._iter_rows(start, batch):
            yield _raw(row)

    def verify(
        self, expected_head: tuple[int, bytes] | None = None, *, jobs: int = 1
    ) -> VerifyResult:
        """Verify the whole stored chain and Merkle tree; see `ledger.verify.verify_chain`.

        Every stored tree hash (the tile levels) is compared with the node recomputed
        from the bodies; then the root of the verified size is read back from the tiles,
        the way
        `root()` (and so every published root) computes it, and must be the same.
        `jobs` > 1 checks segments of the ledger in that many processes (see
        ledger/verify_parallel.py); the result is the same, first bad seq included.
        """
        if jobs > 1:
            from ledger.storage.verify_parallel import verify_parallel  # it imports this module

            result = verify_parallel(self, expected_head, jobs)
        else:
            tree = TreeCheck(self._th, self._iter_tree_rows())
            result = verify_chain(self.iter_raw(), expected_head, tree)
        return self._check_stored_root(result)

    def _resume_verify(
        self, expected_head: tuple[int, bytes] | None, start: VerifyStart
    ) -> VerifyResult:
        """Verify sequentially from seq `start.count`, the entries before taken as good."""
        tree = TreeCheck(self._th, self._iter_tree_rows(start=start.count))
        return verify_chain(self.iter_raw(start=start.count), expected_head, tree, start)

    def _check_stored_root(self, result: VerifyResult) -> VerifyResult:
        if result.ok and self.root(result.entries) != result.merkle_root:
            problem = (
                f"{MERKLE_TREE_MISMATCH}: the root read from stored nodes for size "
                f"{result.entries} differs from the root recomputed from the entries"
            )
            return replace(result, ok=False, first_bad_seq=result.entries - 1, problem=problem)
        return result

    # -- raw reads for the parallel verifier (ledger/verify_parallel.py) ---------------

    @property
    def url(self) -> str | None:
        """What another process opens this ledger with (a path, or a URL that may hold
        a password); None for an in-memory database."""
        return self._url

    def _read_driver(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """The rows of one read, unpackable like tuples; bytes columns as bytes (some
        PostgreSQL drivers give memoryview)."""
        try:
            with self._engine.connect() as conn:
                rows: list[Any] = list(conn.exec_driver_sql(sql, params).fetchall())
        except SQLAlchemyError as exc:
            raise self._error("read", exc) from exc
        if rows and any(isinstance(v, memoryview) for v in rows[0]):
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]
        return rows

    def _entry_rows(self, start: int, stop: int) -> list[StoredRow]:
        """The stored rows with start <= seq < stop, in seq order."""
        mark = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        sql = (
            "SELECT seq, ts, kind, actor, subject, body, prev, hash FROM ledger_entries "
            f"WHERE seq >= {mark} AND seq < {mark} ORDER BY seq"
        )
        return self._read_driver(sql, (start, stop))

    def _tree_nodes(
        self, start: int, stop: int, max_level: int | None = None
    ) -> dict[tuple[int, int], bytes]:
        """The stored nodes (those on tile levels, see ledger/tiles.py) completed by
        leaves start <= seq < stop (at most `max_level`), keyed by (level, index); with
        start = stop = 0, every stored node above `max_level`."""
        ranges: dict[int, tuple[int, int]] = {}  # tile level -> node index range
        if start < stop:
            tile_level = 0
            while (1 << (level := TILE_HEIGHT * tile_level)) <= stop and (
                max_level is None or level <= max_level
            ):
                # Node (level, i) is completed by leaf (i + 1) * 2**level - 1.
                lo = ((start + (1 << level)) >> level) - 1
                hi = (stop >> level) - 1
                if lo <= hi:
                    ranges[tile_level] = (lo, hi)
                tile_level += 1
            conditions = [  # our own integers: no parameters needed
                f"level = {tl} AND idx BETWEEN {lo >> TILE_HEIGHT} AND {hi >> TILE_HEIGHT}"
                for tl, (lo, hi) in ranges.items()
            ]
        else:
            conditions = [f"level > {int(max_level or 0) // TILE_HEIGHT}"]
        if not conditions:
            return {}
        hsize = self._th.size
        nodes: dict[tuple[int, int], bytes] = {}
        for tile_level, tile_idx, blob in self._read_driver(_tiles_sql(conditions)):
            level, first = TILE_HEIGHT * tile_level, tile_idx << TILE_HEIGHT
            lo, hi = ranges.get(tile_level, (first, first + TILE_WIDTH - 1))
            for j, h in enumerate(split_hashes(blob, hsize)):
                if lo <= first + j <= hi:
                    nodes[(level, first + j)] = h
        return nodes

    # -- the Merkle tree ----------------------------------------------------------------

    @property
    def tree_hash(self) -> TreeHash:
        """The Merkle tree's hash function, as recorded in the ledger (`merkle_hash`)."""
        return self._th

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root (RFC 9162 MTH) of the first `size` entries (default: all)."""

        def compute(conn: Connection, current: int) -> bytes:
            n = current if size is None else _in_range("tree size", size, 0, current, _has(current))
            return self._from_nodes(conn, lambda get: root_at(self._th, n, get))

        return self._read_tree("compute the Merkle root of", compute)

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 inclusion proof of entry `seq` in the tree of `size` entries
        (default: all), leaf's sibling first; O(log n) node reads."""

        def compute(conn: Connection, current: int) -> list[bytes]:
            n = current if size is None else _in_range("tree size", size, 0, current, _has(current))
            why = _has(current) if size is None else f"not in the tree of size {n}"
            index = _in_range("seq", seq, 0, n - 1, why)
            return self._from_nodes(conn, lambda get: inclusion_proof(self._th, index, n, get))

        return self._read_tree("prove inclusion in", compute)

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """The RFC 9162 consistency proof from the tree of `m` entries to the tree of
        `n` entries (empty when m == n or m == 0); O(log n) node reads."""

        def compute(conn: Connection, current: int) -> list[bytes]:
            second = _in_range("second tree size", n, 0, current, _has(current))
            first = _in_range("first tree size", m, 0, second, f"it exceeds the second, {n}")
            return self._from_nodes(
                conn, lambda get: consistency_proof(self._th, first, second, get)
            )

        return self._read_tree("prove consistency in", compute)

    def leaf_hash(self, seq: int) -> bytes:
        """The stored Merkle leaf hash of entry `seq`: HASH(0x00 || body)."""

        def compute(conn: Connection, current: int) -> bytes:
            index = _in_range("seq", seq, 0, current - 1, _has(current))
            return self._from_nodes(conn, lambda get: get(0, index))

        return self._read_tree("read the Merkle tree of", compute)

    def subtree_hashes(self, coords: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The hashes of the complete subtrees at `coords` (level, index), read from the
        tiles; those the tiles do not hold are left out."""
        wanted = list(coords)
        try:
            with self._engine.connect() as conn:
                tiles = self._read_tiles(
                    conn, {(s.tile_level, s.tile_idx) for s in map(lambda c: locate(*c), wanted)}
                )
        except SQLAlchemyError as exc:
            raise self._error("read the Merkle tree of", exc) from exc
        get = self._tile_getter(tiles)
        found: dict[tuple[int, int], bytes] = {}
        for level, idx in wanted:
            try:
                found[(level, idx)] = get(level, idx)
            except StoreError:
                continue
        return found

    def _read_tree(self, action: str, compute: Callable[[Connection, int], _T]) -> _T:
        # One read transaction (a snapshot in SQLite WAL), so the size and the tiles agree.
        # The size is the tree's own (every append writes its leaves in the transaction
        # that writes the entries): read from the last leaf tile, whose pages a proof at
        # that size reads anyway, not from the entries' B-tree (3 more cold page reads).
        try:
            with self._engine.connect() as conn:
                last = conn.exec_driver_sql(_TREE_SIZE_SQL).first()
                size = 0 if last is None else last[0] * TILE_WIDTH + last[1] // self._th.size
                return compute(conn, size)
        except SQLAlchemyError as exc:
            raise self._error(action, exc) from exc

    def _from_nodes(self, conn: Connection, compute: Callable[[GetNode], _T]) -> _T:
        """Run `compute(get_node)` with every tile it needs read in one statement: a dry
        run records which nodes it asks for (what it asks never depends on the hashes)."""
        wanted: set[TileKey] = set()
        blank = bytes(self._th.size)

        def record(level: int, idx: int) -> bytes:
            span = locate(level, idx)
            wanted.add((span.tile_level, span.tile_idx))
            return blank

        compute(record)
        return compute(self._tile_getter(self._read_tiles(conn, wanted)))

    def _read_tiles(self, conn: Connection, keys: Iterable[TileKey]) -> dict[TileKey, bytes]:
        """The stored tiles among `keys` (missing ones are left out)."""
        found: dict[TileKey, bytes] = {}
        wanted = sorted(keys)
        for start in range(0, len(wanted), _TREE_READ_CHUNK):
            chunk = wanted[start : start + _TREE_READ_CHUNK]
            # Plain SQL, integers inlined (ours, computed): a proof on a freshly opened
            # store costs no statement compilation, just the O(log n) index lookups.
            for level, idx, blob in conn.exec_driver_sql(_tiles_sql(
                f"level = {int(lv)} AND idx = {int(i)}" for lv, i in chunk
            )):  # fmt: skip
                found[(level, idx)] = bytes(blob)
        return found

    def _tile_getter(self, tiles: dict[TileKey, bytes]) -> GetNode:
        """`get_node` over tiles already read: a stored hash, or the stored hashes
        under the node hashed up (at most 15 node hashes)."""
        hsize, digest = self._th.size, self._th.digest

        def get(level: int, idx: int) -> bytes:
            span = locate(level, idx)
            blob = tiles.get((span.tile_level, span.tile_idx), b"")
            lo, hi = span.start * hsize, (span.start + span.count) * hsize
            if len(blob) < hi:
                raise StoreError(
                    f"ledger {self._where}: Merkle tree node (level {level}, index {idx}) is "
                    f"missing: tile (level {span.tile_level}, index {span.tile_idx}) holds "
                    f"{len(blob) // hsize} hashes (run `ledger verify`)"
                )
            if span.count == 1:
                return blob[lo:hi]
            return hash_up(digest, split_hashes(blob[lo:hi], hsize))

        return get

    def _iter_tree_rows(self, batch: int = 4096, start: int = 0) -> Iterator[TreeRow]:
        """Stored tree nodes in the order appends complete them (see `TreeCheck`), from
        those completed by leaf `start` on: per batch of leaves [start, end), the nodes
        whose last leaf falls in it."""
        while True:
            end = start + batch
            nodes = self._tree_nodes(start, end)
            if not nodes:
                return
            # Sort by (completing seq, level).
            for _, level, idx in sorted(
                (((idx + 1) << level) - 1, level, idx) for level, idx in nodes
            ):
                yield TreeRow(level, idx, nodes[(level, idx)])
            start = end

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

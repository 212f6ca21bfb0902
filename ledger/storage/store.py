"""The ledger's storage: an append-only SQL table, SQLite (WAL) or PostgreSQL.

`LedgerStore` opens a ledger, appends to it and reads it back. Around it in this package:
the tables and triggers (schema.py), the driver-level SQL and error mapping (sql.py), and
the stored Merkle tree's reads (tree.py). The hot append path uses SQLAlchemy Core; the
hub keeps its projection tables in the same database and updates them in the same
transaction as the append, through the `apply` callback.

One writer at a time is enforced by the database, not by this process: SQLite takes
its write lock at `BEGIN IMMEDIATE` (so the head we read cannot move under us), and
PostgreSQL takes a self-conflicting table lock. The primary key on `seq` is the
backstop: two appends can never both write the same seq.

Each append computes the new Merkle leaves and the nodes they complete from the O(log n)
subtree hashes on the tree's right edge, and in the same transaction inserts the tiles
they start and extends the partial ones (ledger/storage/tree.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import blake3
from sqlalchemy import Connection, Engine, Row, Select, create_engine, func, inspect, select
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from ledger.entry import CHAIN_DOMAIN, GENESIS_PREV, HASH_NAME, Entry, encode_body
from ledger.errors import EntryError, LedgerNotFoundError, StoreError
from ledger.merkle import BLAKE3, HASHES, LEAF_PREFIX, MerkleFrontier, TreeHash
from ledger.storage.schema import ENTRIES, FORMAT, META, ROW_COLUMNS, create_schema
from ledger.storage.sql import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DEFAULT_SYNCHRONOUS,
    ENTRY_INSERT,
    HEAD_SQL,
    PG_SCHEMA_LOCK_KEY,
    TILE_EXTEND,
    TILE_INSERT,
    WRITE_TXN_OPTION,
    Synchronous,
    insert_sql,
    install_sqlite_hooks,
    is_memory,
    read_driver,
    run_driver,
    store_error,
    to_url,
)
from ledger.storage.tree import Edge, TileTree
from ledger.verify import (
    MERKLE_TREE_MISMATCH,
    RawRow,
    StoredRow,
    TreeCheck,
    VerifyResult,
    VerifyStart,
    verify_chain,
)

ApplyCallback = Callable[[Connection, list[Entry]], None]
_blake3 = blake3.blake3


@dataclass(frozen=True)
class NewEvent:
    """An event to append; seq, prev and hash are assigned by the store."""

    kind: str
    actor: str
    subject: str
    payload: dict[str, Any] = field(hash=False)
    ts: int | None = None


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
        self._th: TreeHash = BLAKE3  # replaced by what the ledger records, in _prepare
        self._tree = TileTree(engine, where, self._th)
        self._url: str | None = where  # how another process opens it (see open)
        # The right edge after this store's last committed append.
        self._edge: Edge | None = None

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
        ledger is created (default sha256) and recorded in it; an existing ledger always
        uses what it recorded, and naming a different one raises `StoreError`."""
        if tree_hash is not None and tree_hash not in HASHES:
            raise StoreError(
                f"unknown Merkle tree hash {tree_hash!r}; choose one of {', '.join(HASHES)}"
            )
        if synchronous not in get_args(Synchronous):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        url = to_url(location)
        where = url.render_as_string(hide_password=True)
        sqlite = url.get_backend_name() == "sqlite"
        if sqlite and not is_memory(url):
            db_file = Path(str(url.database))
            where = str(db_file)
            if not db_file.exists():
                if not create:
                    raise LedgerNotFoundError(f"no ledger database at {db_file}")
                db_file.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if sqlite and is_memory(url):
            kwargs["poolclass"] = StaticPool  # one shared connection, else one db each
        try:
            engine = create_engine(url, **kwargs)
        except (ImportError, ArgumentError) as exc:
            raise StoreError(
                f"cannot open {where}: {exc} (for PostgreSQL install a driver, e.g. "
                "psycopg, and use a postgresql+psycopg:// URL)"
            ) from exc
        if sqlite:
            install_sqlite_hooks(engine, busy_timeout_ms, synchronous)
        store = cls(engine, where)
        if not sqlite:
            store._url = url.render_as_string(hide_password=False)
        elif is_memory(url):
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
                    create_schema(conn, tree_hash)
            if not inspect(self._engine).has_table(META.name):
                raise StoreError(f"{self._where} is not a fleetledger ledger (no ledger_meta)")
            with self._engine.connect() as conn:
                rows = conn.execute(select(META.c.key, META.c.value)).all()
            meta = {str(row.key): str(row.value) for row in rows}
        except SQLAlchemyError as exc:
            raise self._err("open", exc) from exc
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
        self._tree = TileTree(self._engine, self._where, self._th)

    # -- transactions and errors -------------------------------------------------------

    def _err(self, action: str, exc: SQLAlchemyError) -> StoreError:
        return store_error(self._where, action, exc)

    @contextmanager
    def _write_transaction(self, *, schema: bool = False) -> Iterator[Connection]:
        """One write transaction holding the database's writer lock. Errors raised by
        the body (e.g. the caller's `apply`) roll back and propagate unchanged.
        `schema=True`: the tables may not exist yet (PostgreSQL then cannot lock them)."""
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            raise self._err("connect to", exc) from exc
        try:
            conn.execution_options(**{WRITE_TXN_OPTION: True})
            try:
                txn = conn.begin()
                if conn.dialect.name == "postgresql" and schema:
                    # Concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL.
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_SCHEMA_LOCK_KEY})")
                elif conn.dialect.name == "postgresql":
                    # Conflicts with itself, not with readers: one appender at a time.
                    lock = "LOCK TABLE ledger_entries IN SHARE ROW EXCLUSIVE MODE"
                    run_driver(conn, lock).close()
            except SQLAlchemyError as exc:
                raise self._err("lock", exc) from exc
            try:
                yield conn
            except BaseException:
                txn.rollback()
                raise
            try:
                txn.commit()
            except SQLAlchemyError as exc:
                raise self._err("commit to", exc) from exc
        finally:
            conn.close()

    def _fetch(self, stmt: Select[Any]) -> list[Row[Any]]:
        try:
            with self._engine.connect() as conn:
                return list(conn.execute(stmt).all())
        except SQLAlchemyError as exc:
            raise self._err("read", exc) from exc

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
    ) -> tuple[list[Entry], Edge]:
        try:
            cursor = run_driver(conn, HEAD_SQL)
            head = cursor.fetchone()
            cursor.close()
        except SQLAlchemyError as exc:
            raise self._err("read the head of", exc) from exc
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
        inserts, extends, partial = self._tree.tile_writes(edge, frontier.extend(leaves))
        try:
            run_driver(conn, insert_sql(conn, ENTRY_INSERT), rows, many=True).close()
        except IntegrityError as exc:
            raise StoreError(
                f"cannot append to ledger {self._where}: seq {first} was taken "
                "by another writer (the database did not serialise appends)"
            ) from exc
        except SQLAlchemyError as exc:
            raise self._err("append to", exc) from exc
        try:
            if inserts:
                run_driver(conn, insert_sql(conn, TILE_INSERT), inserts, many=True).close()
            if extends:
                run_driver(conn, insert_sql(conn, TILE_EXTEND), extends, many=True).close()
        except IntegrityError as exc:
            raise StoreError(
                f"cannot append to ledger {self._where}: its Merkle tree tiles do not fit "
                f"the entries before seq {first} (run `ledger verify`)"
            ) from exc
        except SQLAlchemyError as exc:
            raise self._err("append to", exc) from exc
        return entries, Edge(frontier.size, entries[-1].hash, frontier.subtrees, partial)

    def _right_edge(self, conn: Connection, size: int, head_hash: bytes) -> Edge:
        """The tree's right edge at `size`: kept from this store's last append when the
        head is still the one it wrote, else read from the tiles."""
        edge = self._edge
        if edge is not None and edge.size == size and edge.head == head_hash:
            return edge
        return self._tree.read_edge(conn, size, head_hash)

    # -- reading -----------------------------------------------------------------------

    def head(self) -> Entry | None:
        """The last entry, or None for an empty ledger."""
        rows = self._fetch(select(*ROW_COLUMNS).order_by(ENTRIES.c.seq.desc()).limit(1))
        return _entry(rows[0]) if rows else None

    def count(self) -> int:
        """The number of stored entries."""
        rows = self._fetch(select(func.count()).select_from(ENTRIES))
        return int(rows[0][0])

    def head_seq(self, conn: Connection | None = None) -> int | None:
        """The seq of the last entry, None for an empty ledger; read in `conn`'s
        transaction when given (e.g. inside an append's `apply`), else in its own."""
        stmt = select(func.max(ENTRIES.c.seq))
        head = conn.execute(stmt).scalar() if conn is not None else self._fetch(stmt)[0][0]
        return None if head is None else int(head)

    def get(self, seq: int) -> Entry | None:
        rows = self._fetch(select(*ROW_COLUMNS).where(ENTRIES.c.seq == seq))
        return _entry(rows[0]) if rows else None

    def tail(self, n: int) -> list[Entry]:
        """The last `n` entries, oldest first."""
        if n <= 0:
            return []
        rows = self._fetch(select(*ROW_COLUMNS).order_by(ENTRIES.c.seq.desc()).limit(n))
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
                select(*ROW_COLUMNS)
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

    def verify(self, expected_head: tuple[int, bytes] | None = None) -> VerifyResult:
        """Verify the whole stored chain and Merkle tree; see `ledger.verify.verify_chain`.

        Every stored tree hash (the tile levels) is compared with the node recomputed
        from the bodies; then the root of the verified size is read back from the tiles,
        the way `root()` (and so every published root) computes it, and must be the same.
        To check segments in several processes: ledger/storage/verify_parallel.py.
        """
        start = VerifyStart(0, GENESIS_PREV)
        return self.check_stored_root(self.verify_from(expected_head, start))

    def verify_from(
        self, expected_head: tuple[int, bytes] | None, start: VerifyStart
    ) -> VerifyResult:
        """Verify sequentially from seq `start.count`, the entries before taken as good
        (`start` carries the hash and tree edge they end with)."""
        tree = TreeCheck(self._th, self._tree.iter_tree_rows(start=start.count))
        return verify_chain(self.iter_raw(start=start.count), expected_head, tree, start)

    def check_stored_root(self, result: VerifyResult) -> VerifyResult:
        """`result`, made a failure if the root read back from the stored tiles at the
        verified size differs from the root recomputed from the entries."""
        if result.ok and self.root(result.entries) != result.merkle_root:
            problem = (
                f"{MERKLE_TREE_MISMATCH}: the root read from stored nodes for size "
                f"{result.entries} differs from the root recomputed from the entries"
            )
            return replace(result, ok=False, first_bad_seq=result.entries - 1, problem=problem)
        return result

    # -- segment reads (the parallel verifier, ledger/storage/verify_parallel.py) -------

    @property
    def url(self) -> str | None:
        """What another process opens this ledger with (a path, or a URL that may hold
        a password); None for an in-memory database."""
        return self._url

    def count_and_last_seq(self) -> tuple[int, int | None]:
        """(stored rows, highest seq or None), in one read: they differ when rows are
        missing."""
        count, head = read_driver(
            self._engine, self._where, "SELECT count(*), max(seq) FROM ledger_entries"
        )[0]
        return int(count), None if head is None else int(head)

    def entry_rows(self, start: int, stop: int) -> list[StoredRow]:
        """The stored rows with start <= seq < stop, in seq order, undecoded."""
        mark = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        sql = (
            "SELECT seq, ts, kind, actor, subject, body, prev, hash FROM ledger_entries "
            f"WHERE seq >= {mark} AND seq < {mark} ORDER BY seq"
        )
        return read_driver(self._engine, self._where, sql, (start, stop))

    def tree_nodes(
        self, start: int, stop: int, max_level: int | None = None
    ) -> dict[tuple[int, int], bytes]:
        """The stored tree nodes completed by leaves start <= seq < stop; see
        `TileTree.tree_nodes`."""
        return self._tree.tree_nodes(start, stop, max_level)

    # -- the Merkle tree ----------------------------------------------------------------

    @property
    def tree_hash(self) -> TreeHash:
        """The Merkle tree's hash function, as recorded in the ledger (`merkle_hash`)."""
        return self._th

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root (RFC 9162 MTH) of the first `size` entries (default: all)."""
        return self._tree.root(size)

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 inclusion proof of entry `seq` in the tree of `size` entries
        (default: all), leaf's sibling first; O(log n) node reads."""
        return self._tree.inclusion_proof(seq, size)

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """The RFC 9162 consistency proof from the tree of `m` entries to the tree of
        `n` entries (empty when m == n or m == 0); O(log n) node reads."""
        return self._tree.consistency_proof(m, n)

    def leaf_hash(self, seq: int) -> bytes:
        """The stored Merkle leaf hash of entry `seq`: HASH(0x00 || body)."""
        return self._tree.leaf_hash(seq)

    def subtree_hashes(self, coords: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The hashes of the complete subtrees at `coords` (level, index), read from the
        tiles; those the tiles do not hold are left out."""
        return self._tree.subtree_hashes(coords)

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

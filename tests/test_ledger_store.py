"""LedgerStore on real SQLite files and a real PostgreSQL server: appends, reads,
atomicity, append-only triggers. One behaviour suite: every test taking `store` or
`ledger_url` (tests/conftest.py) runs on both backends (PostgreSQL from tests/pg.py)."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, make_url, text
from sqlalchemy.exc import IntegrityError

from ledger.entry import GENESIS_PREV, Entry
from ledger.errors import EntryError, LedgerNotFoundError, StoreError
from ledger.storage.schema import FORMAT
from ledger.storage.store import LedgerStore, NewEvent
from ledger.verify import ENTRY_EDITED, MISSING_ENTRY


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def store(ledger_url: str) -> Iterator[LedgerStore]:
    opened = LedgerStore.open(ledger_url)
    yield opened
    opened.close()


def is_postgres(ledger_url: str) -> bool:
    return ledger_url.startswith("postgresql")


def raw_execute(ledger_url: str, *statements: str, disable_triggers: bool = False) -> None:
    """Run SQL on the database directly, with the driver, bypassing LedgerStore (what
    someone with the file or a superuser login can do)."""
    if is_postgres(ledger_url):
        conninfo = make_url(ledger_url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(conninfo) as pg:  # commits on a clean exit
            if disable_triggers:
                pg.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ALL")
            for sql in statements:
                pg.execute(sql.encode())
        return
    raw = sqlite3.connect(ledger_url)
    try:
        if disable_triggers:
            raw.execute("DROP TRIGGER ledger_entries_no_update")
            raw.execute("DROP TRIGGER ledger_entries_no_delete")
        for sql in statements:
            raw.execute(sql)
        raw.commit()
    finally:
        raw.close()


def blob_literal(ledger_url: str, data: bytes) -> str:
    return f"'\\x{data.hex()}'::bytea" if is_postgres(ledger_url) else f"x'{data.hex()}'"


def fill(store: LedgerStore, n: int) -> list[Entry]:
    return [
        store.append("device.status", f"dev-{i}", f"device:dev-{i}", {"i": i, "b": b"\x01" * i})
        for i in range(n)
    ]


def test_append_and_read_back(store: LedgerStore) -> None:
    appended = store.append("model.registered", "op-1", "model:kws/3", {"digest": b"\xaa" * 32},
                            ts=123)  # fmt: skip
    assert appended.seq == 0 and appended.ts == 123 and appended.prev == GENESIS_PREV
    assert store.get(0) == appended
    assert store.head() == appended
    assert store.count() == 1
    assert store.get(1) is None


def test_empty_ledger(store: LedgerStore) -> None:
    assert store.head() is None and store.count() == 0 and store.tail(5) == []
    result = store.verify()
    assert result.ok and result.entries == 0


def test_entries_chain_across_calls_and_reopen(ledger_url: str) -> None:
    with LedgerStore.open(ledger_url) as first:
        a = first.append("a.b", "hub", "s", {})
        bc = first.append_many([NewEvent("a.c", "hub", "s", {"n": 1}),
                                NewEvent("a.d", "hub", "t", {}, ts=7)])  # fmt: skip
    with LedgerStore.open(ledger_url) as again:
        d = again.append("a.e", "hub", "s", {})
        entries = list(again.iter_entries())
    assert [e.seq for e in entries] == [0, 1, 2, 3]
    assert entries == [a, *bc, d]
    for before, after in itertools.pairwise(entries):
        assert after.prev == before.hash
    assert all(e.hash_matches() for e in entries)


def test_default_ts_is_the_wall_clock_in_ns(store: LedgerStore) -> None:
    import time

    before = time.time_ns()
    entry = store.append("a.b", "hub", "s", {})
    assert before <= entry.ts <= time.time_ns()


def test_iteration_in_batches_and_tail(store: LedgerStore) -> None:
    entries = fill(store, 25)
    assert list(store.iter_entries(batch=4)) == entries
    assert list(store.iter_entries(start=20, batch=3)) == entries[20:]
    assert [r.hash for r in store.iter_raw(batch=7)] == [e.hash for e in entries]
    assert store.tail(3) == entries[-3:]
    assert store.tail(100) == entries
    assert store.verify().head_hash == entries[-1].hash


def test_apply_runs_in_the_same_transaction(store: LedgerStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE projection (seq INTEGER, kind TEXT)"))

    def project(conn: Connection, entries: list[Entry]) -> None:
        for e in entries:
            conn.execute(text("INSERT INTO projection VALUES (:s, :k)"), {"s": e.seq, "k": e.kind})

    store.append_many([NewEvent("a.b", "hub", "s", {}), NewEvent("a.c", "hub", "s", {})], project)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT seq, kind FROM projection")).all() == [(0, "a.b"),
                                                                                (1, "a.c")]


def test_failing_apply_leaves_the_ledger_unchanged(store: LedgerStore) -> None:
    fill(store, 2)
    head = store.head()
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE projection (seq INTEGER)"))

    class Refused(Exception):
        pass

    def project_then_fail(conn: Connection, entries: list[Entry]) -> None:
        conn.execute(text("INSERT INTO projection VALUES (:s)"), {"s": entries[0].seq})
        raise Refused("command rejected")

    with pytest.raises(Refused):
        store.append("a.b", "hub", "s", {}, apply=project_then_fail)
    assert store.count() == 2 and store.head() == head
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM projection")).scalar() == 0
    assert store.append("a.c", "hub", "s", {}).seq == 2


def test_invalid_event_appends_nothing(store: LedgerStore) -> None:
    with pytest.raises(EntryError, match="kind"):
        store.append_many([NewEvent("a.b", "hub", "s", {}), NewEvent("Bad", "hub", "s", {})])
    assert store.count() == 0


def test_update_and_delete_are_refused(store: LedgerStore, ledger_url: str) -> None:
    fill(store, 3)
    statements = ["UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 1",
                  "DELETE FROM ledger_entries WHERE seq = 2"]  # fmt: skip
    if is_postgres(ledger_url):
        statements.append("TRUNCATE ledger_entries")  # SQLite has no TRUNCATE
    for sql in statements:
        with pytest.raises(IntegrityError, match="append-only"), store.engine.begin() as conn:
            conn.execute(text(sql))
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError), match="append-only"):
            raw_execute(ledger_url, sql)
    assert store.verify().ok and store.count() == 3


def tamper(ledger_url: str, *statements: str) -> None:
    raw_execute(ledger_url, *statements, disable_triggers=True)


def test_tampered_payload_is_found(store: LedgerStore, ledger_url: str) -> None:
    entries = fill(store, 6)
    body = bytearray(entries[4].body)
    body[-1] ^= 0x01  # the last byte is inside the payload
    edited = blob_literal(ledger_url, bytes(body))
    tamper(ledger_url, f"UPDATE ledger_entries SET body = {edited} WHERE seq = 4")
    result = store.verify()
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 4, ENTRY_EDITED)
    assert result.entries == 4


def test_deleted_middle_row_is_reported_missing(store: LedgerStore, ledger_url: str) -> None:
    fill(store, 6)
    tamper(ledger_url, "DELETE FROM ledger_entries WHERE seq = 3")
    result = store.verify()
    assert not result.ok and result.first_bad_seq == 3
    assert result.problem is not None and result.problem.startswith(MISSING_ENTRY)


def test_sqlite_is_in_wal_mode_and_records_its_format(db_path: Path) -> None:
    store = LedgerStore.open(db_path)
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        meta = dict(raw.execute("SELECT key, value FROM ledger_meta").fetchall())
    finally:
        raw.close()
    # chain hash BLAKE3; Merkle tree SHA-256 by default (RFC 6962: C2SP tooling checks it)
    assert meta == {"format": FORMAT, "hash": "blake3", "merkle_hash": "sha256"}
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()


def test_sqlite_synchronous_is_configurable(db_path: Path) -> None:
    with LedgerStore.open(db_path, synchronous="NORMAL") as store:
        store.append("a.b", "hub", "s", {})
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with pytest.raises(ValueError, match="synchronous"):
        LedgerStore.open(db_path, synchronous="OFF")  # type: ignore[arg-type]


def test_open_without_create(tmp_path: Path) -> None:
    with pytest.raises(LedgerNotFoundError, match="no ledger database"):
        LedgerStore.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_open_refuses_files_that_are_not_ledgers(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        LedgerStore.open(garbage, create=False)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a fleetledger ledger"):
        LedgerStore.open(other, create=False)


def test_open_refuses_an_unknown_format(ledger_url: str) -> None:
    LedgerStore.open(ledger_url).close()
    raw_execute(
        ledger_url, "UPDATE ledger_meta SET value = 'fleetledger-ledger/99' WHERE key = 'format'"
    )
    with pytest.raises(StoreError, match="ledger/99"):
        LedgerStore.open(ledger_url)


def test_sqlite_url_and_memory(tmp_path: Path) -> None:
    with LedgerStore.open(f"sqlite:///{tmp_path / 'by-url.db'}") as by_url:
        by_url.append("a.b", "hub", "s", {})
    assert (tmp_path / "by-url.db").exists()
    with LedgerStore.open("sqlite://") as memory:
        fill(memory, 3)
        assert memory.verify().entries == 3


def test_concurrent_appenders_never_interleave(ledger_url: str) -> None:
    # Two stores on one database stand in for two processes; the database serialises them.
    stores = [LedgerStore.open(ledger_url), LedgerStore.open(ledger_url)]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for i in range(20):
                stores[index % 2].append_many(
                    [NewEvent("a.b", f"w{index}", "s", {"i": i}) for _ in range(3)]
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    result = stores[0].verify()
    assert result.ok and result.entries == 4 * 20 * 3
    batches = [e.actor for e in stores[1].iter_entries()]
    # Each append_many is contiguous: no batch was split by another writer.
    assert all(len(set(batches[i:i + 3])) == 1 for i in range(0, len(batches), 3))
    for s in stores:
        s.close()


def test_append_waits_for_another_writer_then_gives_up_clearly(db_path: Path) -> None:
    LedgerStore.open(db_path).close()
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with LedgerStore.open(db_path, create=False, busy_timeout_ms=100) as store:
            with pytest.raises(StoreError, match="locked by another writer"):
                store.append("a.b", "hub", "s", {})
            assert store.count() == 0  # readers are not blocked (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_head_seq_inside_and_outside_a_transaction(store: LedgerStore) -> None:
    assert store.head_seq() is None
    seen: list[int | None] = []
    store.append_many([NewEvent("test.kind", "tester", "s", {}) for _ in range(3)],
                      apply=lambda conn, _entries: seen.append(store.head_seq(conn)))
    assert seen == [2]  # the apply callback sees its own uncommitted rows
    assert store.head_seq() == 2

"""`verify_store(store, jobs=N)`: segments checked in worker processes give exactly the
sequential verifier's report (first bad seq, problem, good entries, head, root), on
both backends, wherever the damage is: inside a segment, at a seam, above the segments."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

import ledger.storage.verify_parallel as verify_parallel
from ledger.entry import Entry
from ledger.storage.store import LedgerStore, NewEvent
from ledger.storage.verify_parallel import segment_level, verify_store
from ledger.tiles import TILE_HEIGHT, TILE_WIDTH

# Segments of 16 below: 37 full ones and a short last one; the tree has tiles on three
# levels (leaves; roots of 16-leaf subtrees, the segments' own; roots of 256-leaf
# subtrees, above the segments).
ENTRIES = 600
TS = 1_700_000_000_000_000_000
BAD_PREV = b"\x07" * 32


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many small segments, so a few hundred entries exercise every seam and level.
    monkeypatch.setattr(verify_parallel, "MIN_SEGMENT_LEVEL", 2)
    monkeypatch.setattr(verify_parallel, "MAX_SEGMENT_LEVEL", 4)


def event(i: int) -> NewEvent:
    return NewEvent("device.status", f"dev-{i % 7}", f"device:dev-{i % 7}", {"i": i}, ts=TS + i)


@pytest.fixture
def store(ledger_url: str) -> Iterator[LedgerStore]:
    opened = LedgerStore.open(ledger_url)
    for start in range(0, ENTRIES, 50):
        stop = min(start + 50, ENTRIES)
        opened.append_many([event(i) for i in range(start, stop)])
    yield opened
    opened.close()


def tamper(url: str, statement: str) -> None:
    """Run `statement` with the append-only triggers out of the way (what someone with
    the file, or a superuser login, can do)."""
    if url.startswith("postgresql"):
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(conninfo) as pg:
            pg.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ALL")
            pg.execute("ALTER TABLE ledger_tiles DISABLE TRIGGER ALL")
            pg.execute(statement.encode())
        return
    raw = sqlite3.connect(url)
    try:
        for trigger in ("entries_no_update", "entries_no_delete", "tiles_no_delete",
                        "tiles_only_grow"):  # fmt: skip
            raw.execute(f"DROP TRIGGER ledger_{trigger}")
        raw.execute(statement)
        raw.commit()
    finally:
        raw.close()


def bytea(url: str, data: bytes) -> str:
    return f"'\\x{data.hex()}'::bytea" if url.startswith("postgresql") else f"x'{data.hex()}'"


def test_segments_are_aligned_subtrees() -> None:
    assert segment_level(ENTRIES, 2) == 4
    assert segment_level(10**6, 2) == verify_parallel.MAX_SEGMENT_LEVEL


def test_an_intact_ledger(store: LedgerStore) -> None:
    sequential = store.verify()
    assert sequential.ok and sequential.entries == ENTRIES
    assert verify_store(store, jobs=2) == sequential
    assert verify_store(store, jobs=3) == sequential


@pytest.mark.parametrize("seq", [0, 5, 15, 16, 17, 63, 64, 191, 192, 255, 256, 599])
@pytest.mark.parametrize("damage", ["edit", "delete", "prev", "kind"])
def test_damaged_entries(store: LedgerStore, ledger_url: str, damage: str, seq: int) -> None:
    entry: Entry | None = store.get(seq)
    assert entry is not None
    other = bytea(ledger_url, entry.body[:-1] + bytes([entry.body[-1] ^ 1]))
    statement = {
        "edit": f"UPDATE ledger_entries SET body = {other} WHERE seq = {seq}",
        "delete": f"DELETE FROM ledger_entries WHERE seq = {seq}",
        "prev": f"UPDATE ledger_entries SET prev = {bytea(ledger_url, BAD_PREV)} "
                f"WHERE seq = {seq}",
        "kind": f"UPDATE ledger_entries SET kind = 'x.y' WHERE seq = {seq}",
    }[damage]  # fmt: skip
    tamper(ledger_url, statement)
    sequential = store.verify()
    assert verify_store(store, jobs=2) == sequential
    if (damage, seq) != ("delete", ENTRIES - 1):  # cutting the last entry is not damage
        assert not sequential.ok and sequential.first_bad_seq == seq


def tile_hashes(store: LedgerStore, tile_level: int, tile_idx: int) -> bytes:
    sql = f"SELECT hashes FROM ledger_tiles WHERE level = {tile_level} AND idx = {tile_idx}"
    with store.engine.connect() as conn:
        return bytes(conn.exec_driver_sql(sql).scalar_one())


@pytest.mark.parametrize(
    ("level", "idx"),
    [
        *[(0, 5), (0, 16), (0, 202), (0, 255), (0, 256), (0, 599)],  # leaves
        *[(4, 0), (4, 3), (4, 36), (8, 0), (8, 1)],  # segment roots; above the segments
    ],
)
@pytest.mark.parametrize("damage", ["edit", "cut"])
def test_damaged_tree_nodes(
    store: LedgerStore, ledger_url: str, damage: str, level: int, idx: int
) -> None:
    # The stored node (level, idx) is hash `pos` of tile (level / height, idx / width).
    tile_level, (tile_idx, pos) = level // TILE_HEIGHT, divmod(idx, TILE_WIDTH)
    where = f"WHERE level = {tile_level} AND idx = {tile_idx}"
    hashes = tile_hashes(store, tile_level, tile_idx)
    if damage == "edit":
        hashes = hashes[: pos * 32] + bytes(32) + hashes[(pos + 1) * 32 :]
    else:  # the tile loses this node and every one after it
        hashes = hashes[: pos * 32]
    if hashes:
        tamper(ledger_url, f"UPDATE ledger_tiles SET hashes = {bytea(ledger_url, hashes)} {where}")
    else:
        tamper(ledger_url, f"DELETE FROM ledger_tiles {where}")
    sequential = store.verify()
    assert not sequential.ok and sequential.first_bad_seq == ((idx + 1) << level) - 1
    assert verify_store(store, jobs=2) == sequential


def test_trusted_heads(store: LedgerStore) -> None:
    entry = store.get(100)
    assert entry is not None
    for head in [(100, entry.hash), (100, b"\x01" * 32), (ENTRIES + 5, entry.hash)]:
        sequential = store.verify(head)
        assert verify_store(store, head, jobs=2) == sequential
    assert not verify_store(store, (100, b"\x01" * 32), jobs=2).ok


def test_an_in_memory_ledger_is_verified_in_one_process() -> None:
    with LedgerStore.open("sqlite://") as memory:
        memory.append_many([NewEvent("a.b", "hub", "s", {"i": i}) for i in range(40)])
        assert verify_store(memory, jobs=2) == memory.verify()

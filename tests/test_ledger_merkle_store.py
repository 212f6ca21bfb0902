"""The Merkle tree stored by LedgerStore (SQLite and PostgreSQL): roots and proofs
against the pure reference, the hash choice, append-only tree rows, tampering found by
verification, and the `ledger prove` / `ledger root` commands."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from ledger.entry import Entry
from ledger.errors import ProofError, StoreError, TreeRangeError
from ledger.merkle import (
    HASHES,
    reference_consistency_proof,
    reference_inclusion_proof,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from ledger.storage.store import LedgerStore, NewEvent
from ledger.tiles import TILE_HEIGHT, TILE_WIDTH
from ledger.verify import MERKLE_LEAF_MISMATCH, MERKLE_TREE_MISMATCH

BATCHES = [1, 2, 3, 5, 8, 13, 1, 21, 16]  # 70 entries in appends of varied sizes
TS = 1_700_000_000_000_000_000


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def raw_sql(url: str, *statements: str, unlock_tree: bool = False) -> None:
    """Run SQL with the driver, bypassing LedgerStore; `unlock_tree` first removes the
    append-only triggers of ledger_tiles (what someone with the file or a superuser
    login can do)."""
    if is_postgres(url):
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(conninfo) as pg:  # commits on a clean exit
            if unlock_tree:
                pg.execute("ALTER TABLE ledger_tiles DISABLE TRIGGER ALL")
            for sql in statements:
                pg.execute(sql.encode())
        return
    raw = sqlite3.connect(url)
    try:
        if unlock_tree:
            raw.execute("DROP TRIGGER IF EXISTS ledger_tiles_only_grow")
            raw.execute("DROP TRIGGER IF EXISTS ledger_tiles_no_delete")
        for sql in statements:
            raw.execute(sql)
        raw.commit()
    finally:
        raw.close()


def blob(url: str, data: bytes) -> str:
    return f"'\\x{data.hex()}'::bytea" if is_postgres(url) else f"x'{data.hex()}'"


def tile(store: LedgerStore, tile_level: int, tile_idx: int) -> bytes:
    """The stored hashes of tile (tile_level, tile_idx)."""
    sql = f"SELECT hashes FROM ledger_tiles WHERE level = {tile_level} AND idx = {tile_idx}"
    with store.engine.connect() as conn:
        return bytes(conn.exec_driver_sql(sql).scalar_one())


def set_tile(store: LedgerStore, url: str, tile_level: int, tile_idx: int, hashes: bytes) -> None:
    """Overwrite a tile's hashes, past the triggers."""
    where = f"WHERE level = {tile_level} AND idx = {tile_idx}"
    raw_sql(url, f"UPDATE ledger_tiles SET hashes = {blob(url, hashes)} {where}", unlock_tree=True)


def fill(store: LedgerStore, batches: list[int] = BATCHES) -> list[Entry]:
    entries: list[Entry] = []
    for size in batches:
        start = len(entries)
        entries += store.append_many(
            [
                NewEvent("device.status", f"dev-{i}", f"device:dev-{i}", {"i": i}, ts=TS + i)
                for i in range(start, start + size)
            ]
        )
    return entries


@pytest.fixture
def store(ledger_url: str) -> Iterator[LedgerStore]:
    opened = LedgerStore.open(ledger_url)
    yield opened
    opened.close()


@pytest.mark.parametrize("tree_hash", ["blake3", "sha256"])
def test_roots_and_proofs_match_the_reference(ledger_url: str, tree_hash: str) -> None:
    with LedgerStore.open(ledger_url, tree_hash=tree_hash) as store:
        th = store.tree_hash
        assert th is HASHES[tree_hash]
        assert store.root() == th.empty()
        entries = fill(store)
        leaves = [th.leaf(e.body) for e in entries]
        n = len(leaves)
        assert [store.leaf_hash(seq) for seq in range(n)] == leaves
        assert store.root() == root_from_leaves(th, leaves)
        for size in range(n + 1):
            assert store.root(size) == root_from_leaves(th, leaves[:size]), size
        # Every (seq, size) and (m, size) pair on SQLite; a sample of sizes on PostgreSQL,
        # where each proof is a network round trip.
        sizes = [1, 2, 5, 8, 32, 33, 63, 70] if is_postgres(ledger_url) else range(1, n + 1)
        for size in sizes:
            for seq in range(size):
                proof = store.inclusion_proof(seq, size)
                assert proof == reference_inclusion_proof(th, seq, leaves[:size]), (seq, size)
            for m in range(size + 1):
                proof = store.consistency_proof(m, size)
                assert proof == reference_consistency_proof(th, m, leaves[:size]), (m, size)
        result = store.verify()
        assert result.ok and result.entries == n and result.merkle_root == store.root()


def test_proofs_from_a_reopened_store(ledger_url: str) -> None:
    with LedgerStore.open(ledger_url, tree_hash="sha256") as store:
        entries = fill(store, [7, 6])
    with LedgerStore.open(ledger_url, create=False) as store:
        th = store.tree_hash
        assert th.name == "sha256"
        root, root_5 = store.root(), store.root(5)
        for e in entries:
            verify_inclusion(th, e.seq, 13, th.leaf(e.body), store.inclusion_proof(e.seq), root)
        verify_consistency(th, 5, 13, root_5, root, store.consistency_proof(5, 13))
        # Appends after reopening continue the same tree.
        more = fill(store, [3])
        leaves = [th.leaf(e.body) for e in entries] + [th.leaf(e.body) for e in more]
        assert more[0].seq == 13 and store.root() == root_from_leaves(th, leaves)
        assert store.verify().ok


def test_the_tree_hash_is_chosen_when_the_ledger_is_created(ledger_url: str) -> None:
    with LedgerStore.open(ledger_url, tree_hash="sha256") as store:
        store.append("a.b", "hub", "s", {})
    with LedgerStore.open(ledger_url) as store:
        assert store.tree_hash.name == "sha256"
    with LedgerStore.open(ledger_url, tree_hash="sha256") as store:
        assert store.tree_hash.name == "sha256"
    with pytest.raises(StoreError, match="created with Merkle tree hash 'sha256'"):
        LedgerStore.open(ledger_url, tree_hash="blake3")
    with pytest.raises(StoreError, match="unknown Merkle tree hash 'md5'"):
        LedgerStore.open(ledger_url, tree_hash="md5")


def test_sha256_is_the_default_and_a_ledger_keeps_its_recorded_hash(tmp_path: Path) -> None:
    with LedgerStore.open(tmp_path / "l.db") as store:
        assert store.tree_hash.name == "sha256"  # RFC 6962: standard tooling checks it
    with LedgerStore.open(tmp_path / "b3.db", tree_hash="blake3") as store:
        store.append("device.status", "a", "device:a", {"i": 1})
    with LedgerStore.open(tmp_path / "b3.db") as store:  # no hash named: the recorded one
        assert store.tree_hash.name == "blake3"
    with LedgerStore.open(tmp_path / "b3.db", create=False) as store:
        assert store.tree_hash.name == "blake3"


def test_ledgers_without_a_tree_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    LedgerStore.open(path).close()
    raw_sql(str(path), "DELETE FROM ledger_meta WHERE key = 'merkle_hash'")
    with pytest.raises(StoreError, match="before the Merkle tree"):
        LedgerStore.open(path)


def test_tiles_only_grow(store: LedgerStore, ledger_url: str) -> None:
    fill(store, [4])
    hashes = tile(store, 0, 0)
    changed = bytes([hashes[0] ^ 1]) + hashes[1:] + bytes(32)  # longer, but not an extension
    where = "WHERE level = 0 AND idx = 0"
    statements = [f"UPDATE ledger_tiles SET hashes = hashes {where}",
                  f"UPDATE ledger_tiles SET hashes = {blob(ledger_url, hashes[:64])} {where}",
                  f"UPDATE ledger_tiles SET hashes = {blob(ledger_url, changed)} {where}",
                  f"UPDATE ledger_tiles SET idx = 1 {where}",
                  "DELETE FROM ledger_tiles WHERE level = 0"]  # fmt: skip
    if is_postgres(ledger_url):
        statements.append("TRUNCATE ledger_tiles")
    for sql in statements:
        with pytest.raises(IntegrityError, match="append-only"), store.engine.begin() as conn:
            conn.execute(text(sql))
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError), match="append-only"):
            raw_sql(ledger_url, sql)
    assert tile(store, 0, 0) == hashes
    assert store.verify().ok


def test_appends_extend_the_right_edge_tiles(store: LedgerStore) -> None:
    th = store.tree_hash
    entries = fill(store, [300, 1, 255, 100, 1, 7])  # 664: full and partial tiles
    leaves = [th.leaf(e.body) for e in entries]
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT level, idx, hashes FROM ledger_tiles").all()
    expected = {}
    for tile_level in range(3):
        level = TILE_HEIGHT * tile_level
        nodes = [root_from_leaves(th, leaves[i << level : (i + 1) << level])
                 for i in range(len(leaves) >> level)]  # fmt: skip
        for idx in range(0, len(nodes), TILE_WIDTH):
            expected[(tile_level, idx // TILE_WIDTH)] = b"".join(nodes[idx : idx + TILE_WIDTH])
    assert {(lv, ix): bytes(h) for lv, ix, h in rows} == expected
    assert len(expected[(0, 664 // TILE_WIDTH)]) == (664 % TILE_WIDTH) * 32  # partial


def test_a_failed_apply_leaves_no_tree_rows(store: LedgerStore) -> None:
    fill(store, [3])

    def fail(_conn: Connection, _entries: list[Entry]) -> None:
        raise RuntimeError("projection failed")

    with pytest.raises(RuntimeError):
        store.append("a.b", "hub", "s", {}, apply=fail)
    # Three leaves in one tile; nothing of the failed append.
    assert len(tile(store, 0, 0)) == 3 * 32
    fill(store, [2])
    assert len(tile(store, 0, 0)) == 5 * 32
    assert store.verify().ok


def test_a_tampered_leaf_is_named(store: LedgerStore, ledger_url: str) -> None:
    entries = fill(store)
    hashes = tile(store, 0, 0)
    bogus = store.tree_hash.leaf(b"something else")
    set_tile(store, ledger_url, 0, 0, hashes[: 5 * 32] + bogus + hashes[6 * 32 :])
    result = store.verify()
    assert (result.ok, result.first_bad_seq, result.problem) == (False, 5, MERKLE_LEAF_MISMATCH)
    assert result.entries == 5 and result.head_hash == entries[4].hash
    th = store.tree_hash
    assert result.merkle_root == root_from_leaves(th, [th.leaf(e.body) for e in entries[:5]])


def test_a_tampered_upper_node_is_named(store: LedgerStore, ledger_url: str) -> None:
    entries = fill(store, [200, 400])
    # Node (level 8, index 1) covers seqs 256..511, is completed by seq 511 and is stored
    # as hash 1 of tile (8 / TILE_HEIGHT, 0).
    hashes = tile(store, 8 // TILE_HEIGHT, 0)
    set_tile(store, ledger_url, 8 // TILE_HEIGHT, 0, hashes[:32] + bytes(32))
    result = store.verify()
    assert not result.ok and result.first_bad_seq == 511
    assert result.problem == (
        f"{MERKLE_TREE_MISMATCH}: node (level 8, index 1) differs from the hash of its children"
    )
    # Proofs through that node no longer lead to the true root.
    th = store.tree_hash
    root = root_from_leaves(th, [th.leaf(e.body) for e in entries])
    with pytest.raises(ProofError, match="does not lead to the root"):
        verify_inclusion(th, 0, 600, store.leaf_hash(0), store.inclusion_proof(0, 600), root)


def test_missing_tree_hashes_are_named(store: LedgerStore, ledger_url: str) -> None:
    fill(store, [200, 400])
    upper = 8 // TILE_HEIGHT  # the tile level of node (8, 1), hash 1 of its first tile
    set_tile(store, ledger_url, upper, 0, tile(store, upper, 0)[:32])  # node (8, 1) cut off
    result = store.verify()
    assert not result.ok and result.first_bad_seq == 511
    assert result.problem == f"{MERKLE_TREE_MISMATCH}: the node (level 8, index 1) is missing " \
        "(found level 0, index 512)"  # fmt: skip
    with pytest.raises(StoreError, match=r"node \(level 8, index 1\) is missing"):
        store.inclusion_proof(0, 600)
    # An append that finds its right edge short refuses rather than building on it.
    short = rf"tile \(level {upper}, index 0\) holds 1 hash"
    with LedgerStore.open(ledger_url, create=False) as s2, pytest.raises(StoreError, match=short):
        s2.append("a.b", "hub", "s", {})
    # Leaf 41 and the leaves after it in its tile cut off.
    set_tile(store, ledger_url, 0, 41 // TILE_WIDTH, tile(store, 0, 41 // TILE_WIDTH)[: 9 * 32])
    result = store.verify()
    assert result.first_bad_seq == 41 and result.problem is not None
    assert result.problem.startswith(f"{MERKLE_LEAF_MISMATCH}: the leaf is missing (found")


def test_proofs_across_tile_levels(tmp_path: Path) -> None:
    """Sizes past 16**3 entries: tiles on four levels, proofs hashed up from them."""
    th = HASHES["sha256"]
    top = TILE_WIDTH**3
    n = top + 300
    with LedgerStore.open(tmp_path / "big.db", tree_hash="sha256") as store:
        events = [NewEvent("a.b", "hub", "s", {"i": i}, ts=TS + i) for i in range(n)]
        entries = []
        for start in range(0, len(events), 777):
            entries += store.append_many(events[start : start + 777])
        leaves = [th.leaf(e.body) for e in entries]
        for size in (top - 1, top, top + 1, n):
            assert store.root(size) == root_from_leaves(th, leaves[:size]), size
        for seq, size in [(0, n), (top - 1, n), (n - 1, n), (300, top + 1), (1234, top - 1)]:
            proof = store.inclusion_proof(seq, size)
            assert proof == reference_inclusion_proof(th, seq, leaves[:size]), (seq, size)
        for m, size in [(1, n), (256, top + 1), (top, n), (4000, n - 1), (17, 4003)]:
            proof = store.consistency_proof(m, size)
            assert proof == reference_consistency_proof(th, m, leaves[:size]), (m, size)
        assert len(tile(store, 3, 0)) == 32  # the root of the first 16**3 leaves
        result = store.verify()
        assert result.ok and result.merkle_root == root_from_leaves(th, leaves)


def test_out_of_range_requests(store: LedgerStore) -> None:
    with pytest.raises(TreeRangeError, match="seq 0 is out of range: the ledger is empty"):
        store.inclusion_proof(0)
    fill(store, [5])
    with pytest.raises(TreeRangeError, match=r"tree size 6 is out of range \(allowed: 0..5\)"):
        store.root(6)
    with pytest.raises(TreeRangeError, match="seq 5 is out of range"):
        store.inclusion_proof(5)
    with pytest.raises(TreeRangeError, match=r"seq 3 is out of range.*tree of size 3"):
        store.inclusion_proof(3, 3)
    with pytest.raises(TreeRangeError, match="first tree size 4 is out of range"):
        store.consistency_proof(4, 3)
    with pytest.raises(TreeRangeError, match="second tree size 9 is out of range"):
        store.consistency_proof(1, 9)
    with pytest.raises(TreeRangeError, match="seq -1 is out of range"):
        store.leaf_hash(-1)


# -- the `ledger` command ------------------------------------------------------------


def run_ledger(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def ledger_db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path, tree_hash="sha256") as store:
        fill(store, [3, 7])
    return path


def test_ledger_verify_names_a_tampered_tree_row(ledger_db: Path) -> None:
    with LedgerStore.open(ledger_db, create=False) as store:
        hashes = tile(store, 0, 0)
        set_tile(store, str(ledger_db), 0, 0, hashes[: 3 * 32] + bytes(32) + hashes[4 * 32 :])
    done = run_ledger("verify", "--db", str(ledger_db))
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == f"FAIL at seq 3: {MERKLE_LEAF_MISMATCH}"


def test_ledger_prove_prints_a_proof_that_verifies(ledger_db: Path) -> None:
    done = run_ledger("prove", "--db", str(ledger_db), "--seq", "4", "--size", "9", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    th = HASHES[doc["merkle_hash"]]
    assert doc["merkle_hash"] == "sha256" and doc["tree_size"] == 9 and doc["leaf_index"] == 4
    assert doc["entry"]["seq"] == 4
    leaf = th.leaf(bytes.fromhex(doc["body"]))
    assert leaf.hex() == doc["leaf_hash"]
    proof = [bytes.fromhex(h) for h in doc["inclusion_proof"]]
    verify_inclusion(th, 4, 9, leaf, proof, bytes.fromhex(doc["root"]))
    with LedgerStore.open(ledger_db, create=False) as store:
        assert doc["root"] == store.root(9).hex()
        assert proof == store.inclusion_proof(4, 9)

    table = run_ledger("prove", "--db", str(ledger_db), "--seq", "4")
    assert table.returncode == 0, table.stderr
    assert f"leaf hash  {leaf.hex()} (sha256)" in table.stdout
    assert "tree size  10" in table.stdout

    missing = run_ledger("prove", "--db", str(ledger_db), "--seq", "10")
    assert missing.returncode == 2
    assert "seq 10 is out of range" in missing.stderr


def test_ledger_root(ledger_db: Path) -> None:
    with LedgerStore.open(ledger_db, create=False) as store:
        root_all, root_3 = store.root().hex(), store.root(3).hex()
    done = run_ledger("root", "--db", str(ledger_db))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"10 {root_all} sha256"
    done = run_ledger("root", "--db", str(ledger_db), "--size", "3", "--json")
    assert json.loads(done.stdout) == {"size": 3, "root": root_3, "merkle_hash": "sha256"}
    too_big = run_ledger("root", "--db", str(ledger_db), "--size", "11")
    assert too_big.returncode == 2 and "tree size 11 is out of range" in too_big.stderr


def test_protocol_document_worked_example(tmp_path: Path) -> None:
    # The same values are printed in docs/PROTOCOL.md ("Merkle tree", "Worked example").
    events = [
        NewEvent("model.registered", "hub", "model:kws/3",
                 {"name": "kws", "size": 1024, "digest": b"\xaa" * 4, "ratio": 0.5,
                  "tags": ["a", None, True], "Z": -1}, ts=TS),
        NewEvent("model.approved", "op-1", "model:kws/3", {}, ts=TS + 1),
        NewEvent("model.released", "hub", "model:kws/3", {"version": "3"}, ts=TS + 2),
    ]  # fmt: skip
    want = {
        "body 2": "9602cf17979cfe362a0002ae6d6f64656c2e72656c6561736564a3687562ab6d6f64656c"
        "3a6b77732f3381a776657273696f6ea133",
        "leaf 0": "ed5b5dca28d52d187e0a4d3a6fa98800f0fe9939f86d0b93ebc2a88a2deb99af",
        "leaf 1": "78638d23b08c6fd10e03b887087e850a3a2262a809dd0cc9c52a25101f56b99c",
        "leaf 2": "b8bd89cf84927568a5c71a7270fab150fc5a3081e651488f0c439bea642122df",
        "node (1, 0)": "fb208a82fc426b1b78c517e4559c0457a8094f878c2a28d325a5a4b5916981cc",
        "root 3": "a47184674914b071c9ca7b1735aadde87380915d1cba2e14cdd87d1aae0c4e3d",
        "blake3 root 3": "e379fbf8cb19154ba1f1c8417a3ff40ea83a92a1c579ffa2258b78edf2f8dec0",
    }
    with LedgerStore.open(tmp_path / "sha.db", tree_hash="sha256") as store:
        entries = store.append_many(events)
        leaves = [store.leaf_hash(seq) for seq in range(3)]
        node = store.root(2)
        got = {
            "body 2": entries[2].body.hex(),
            **{f"leaf {i}": leaf.hex() for i, leaf in enumerate(leaves)},
            "node (1, 0)": node.hex(),
            "root 3": store.root().hex(),
        }
        assert store.root(1) == leaves[0]
        assert store.inclusion_proof(0) == [leaves[1], leaves[2]]
        assert store.inclusion_proof(2) == [node]
        assert store.consistency_proof(1, 3) == [leaves[1], leaves[2]]
        assert store.consistency_proof(2, 3) == [leaves[2]]
    with LedgerStore.open(tmp_path / "b3.db", tree_hash="blake3") as store:
        store.append_many(events)
        got["blake3 root 3"] = store.root().hex()
    assert got == want
    doc = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    flat = " ".join(doc.split())  # long hex is wrapped over lines in the document
    for name, value in want.items():
        parts = [value[:72], value[72:]] if name == "body 2" else [value]  # wrapped there
        assert all(p in flat for p in parts), f"{name} = {value} is not in docs/PROTOCOL.md"

"""Checking a stored ledger against signed checkpoints.

* `check_against_checkpoint`: the ledger must contain the checkpoint's tree size, and
  its Merkle root at that size must be the signed root. Otherwise the ledger was
  truncated below what the log signed, or it is a fork of it.
* `verify_since`: verify only what was appended after a trusted checkpoint, in
  O(new entries): the stored complete subtrees at the checkpoint's size are checked
  against the signed root (so they are the true ones), the chain is seeded with the
  stored hash of the last checkpointed entry (whose body is proven to be in the signed
  tree), then every new entry is checked as `ledger verify` checks it (ledger/verify.py)
  and its leaf and completed nodes are recomputed; finally the consistency proof from
  the signed root to the new root must verify.

`ledger verify --checkpoint` / `--since-checkpoint` (ledger/cli/audit.py) run these.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, Select, select
from sqlalchemy.exc import SQLAlchemyError

from ledger.checkpoint import Checkpoint
from ledger.entry import GENESIS_PREV, chain_hash
from ledger.errors import ProofError, StoreError
from ledger.merkle import MerkleFrontier, frontier_coordinates, verify_consistency, verify_inclusion
from ledger.note import b64encode
from ledger.storage.schema import ENTRIES
from ledger.storage.store import LedgerStore
from ledger.tiles import is_stored_level
from ledger.verify import MERKLE_LEAF_MISMATCH, MERKLE_TREE_MISMATCH, RawRow, row_problem

CHECKPOINT_TRUNCATED = "truncation below a signed checkpoint"
CHECKPOINT_FORK = "fork: the ledger disagrees with a signed checkpoint"


def check_against_checkpoint(store: LedgerStore, cp: Checkpoint) -> str | None:
    """None if the stored ledger has `cp`'s size and root there, else the problem."""
    size = store.count()
    if cp.size > size:
        return (f"{CHECKPOINT_TRUNCATED}: the checkpoint covers {cp.size} entries, the "
                f"ledger has {size}")
    root = store.root(cp.size)
    if root != cp.root:
        return (f"{CHECKPOINT_FORK}: at tree size {cp.size}\n"
                f"  checkpoint root: {b64encode(cp.root)} ({cp.root.hex()})\n"
                f"  ledger root:     {b64encode(root)} ({root.hex()})")
    return None


@dataclass(frozen=True)
class SinceResult:
    """Outcome of `verify_since`: on success `entries` is the ledger's size and `root`
    its Merkle root; `checked` counts the entries verified (those after the checkpoint)."""

    ok: bool
    checkpoint_size: int
    checked: int
    entries: int
    head_hash: bytes | None
    root: bytes | None
    first_bad_seq: int | None = None
    problem: str | None = None


def _fetch(store: LedgerStore, stmt: Select[Any]) -> list[Row[Any]]:
    try:
        with store.engine.connect() as conn:
            return list(conn.execute(stmt).all())
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read {store.location}: {exc}") from exc


def _rows(store: LedgerStore, start: int, end: int, batch: int) -> Iterator[RawRow]:
    after = start - 1
    cols = (ENTRIES.c.seq, ENTRIES.c.ts, ENTRIES.c.kind, ENTRIES.c.actor, ENTRIES.c.subject,
            ENTRIES.c.body, ENTRIES.c.prev, ENTRIES.c.hash)
    while after + 1 < end:
        rows = _fetch(store, select(*cols).where(ENTRIES.c.seq > after, ENTRIES.c.seq < end)
                      .order_by(ENTRIES.c.seq).limit(batch))
        for r in rows:
            yield RawRow(r.seq, r.ts, r.kind, r.actor, r.subject,
                         bytes(r.body), bytes(r.prev), bytes(r.hash))
        if len(rows) < batch:
            return
        after = rows[-1].seq


def _nodes(store: LedgerStore, coords: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    return store.subtree_hashes(coords)


def verify_since(store: LedgerStore, cp: Checkpoint, batch: int = 1000) -> SinceResult:
    """Verify the entries after a trusted checkpoint (see the module docstring)."""
    th = store.tree_hash
    size = store.count()
    s = cp.size

    def fail(bad: int, problem: str, checked: int = 0) -> SinceResult:
        return SinceResult(False, s, checked, size, None, None, bad, problem)

    if s > size:
        return fail(size, f"{CHECKPOINT_TRUNCATED}: the checkpoint covers {s} entries, "
                          f"the ledger has {size}")
    coords = frontier_coordinates(s)
    stored = _nodes(store, coords)
    if any(c not in stored for c in coords):
        return fail(max(s - 1, 0), f"{MERKLE_TREE_MISMATCH}: stored subtrees at size {s} "
                                   "are missing")
    frontier = MerkleFrontier(th, s, [stored[c] for c in coords])
    if frontier.root() != cp.root:
        return fail(max(s - 1, 0), f"{CHECKPOINT_FORK}: the stored tree at size {s} has "
                                   f"root {b64encode(frontier.root())}, the checkpoint "
                                   f"{b64encode(cp.root)}")
    prev = GENESIS_PREV
    if s > 0:
        last = next(_rows(store, s - 1, s, 1), None)
        if last is None:
            return fail(s - 1, f"missing entry: seq {s - 1} is not stored")
        try:
            proof = store.inclusion_proof(s - 1, s)
            verify_inclusion(th, s - 1, s, th.leaf(last.body), proof, cp.root)
        except ProofError as exc:
            return fail(s - 1, f"{CHECKPOINT_FORK}: entry {s - 1} is not the one the "
                               f"checkpoint signed: {exc}")
        if chain_hash(last.prev, last.body) != last.hash:
            return fail(s - 1, "entry edited: stored hash does not match its contents")
        prev = last.hash
    checked, head = 0, (prev if s > 0 else None)
    pending: list[tuple[int, list[tuple[int, int, bytes]]]] = []

    def check_nodes() -> tuple[int, str] | None:
        # The stored nodes; the others are hashed up from them, so they agree if these do.
        wanted = [(lv, ix) for _, nodes in pending for lv, ix, _ in nodes if is_stored_level(lv)]
        got = _nodes(store, wanted)
        for seq, nodes in pending:
            for lv, ix, want in nodes:
                if is_stored_level(lv) and got.get((lv, ix)) != want:
                    base = MERKLE_LEAF_MISMATCH if lv == 0 else MERKLE_TREE_MISMATCH
                    return seq, f"{base}: stored node (level {lv}, index {ix})"
        pending.clear()
        return None

    for row in _rows(store, s, size, batch):
        found = row_problem(row, s + checked, prev)
        if found is not None:
            return fail(found[0], found[1], checked)
        pending.append((row.seq, frontier.append(th.leaf(row.body))))
        if len(pending) >= batch:
            bad = check_nodes()
            if bad is not None:
                return fail(bad[0], bad[1], checked)
        prev = head = row.hash
        checked += 1
    if s + checked != size:
        return fail(s + checked, f"missing entry: expected seq {s + checked}", checked)
    bad = check_nodes()
    if bad is not None:
        return fail(bad[0], bad[1], checked)
    root = frontier.root()
    try:
        verify_consistency(th, s, size, cp.root, root, store.consistency_proof(s, size))
    except ProofError as exc:
        return fail(size - 1, f"{MERKLE_TREE_MISMATCH}: no consistency from the "
                              f"checkpoint: {exc}", checked)
    return SinceResult(True, s, checked, size, head, root)

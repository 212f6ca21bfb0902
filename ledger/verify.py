"""Streaming verification of a ledger's hash chain and Merkle tree (pure, no I/O).

Works on raw stored rows, one at a time, in O(1) memory for the chain and O(log n) for
the Merkle tree (a `MerkleFrontier`), and never decodes a payload: each check compares
bytes. It stops at the first bad row and names it, because every later hash depends
on that one and would only repeat the same finding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import blake3
import msgpack

from ledger.entry import (
    BODY_ARRAY_HEADER,
    CHAIN_DOMAIN,
    GENESIS_PREV,
    MAX_INT64,
    chain_hash,
    check_header,
    header_prefix,
)
from ledger.errors import EntryError
from ledger.merkle import LEAF_PREFIX, NODE_PREFIX, MerkleFrontier, TreeHash
from ledger.tiles import TILE_HEIGHT

# The problems, worded for the person reading the report. Details follow after ": ".
MISSING_ENTRY = "missing entry"
REORDERED_ENTRY = "reordered/duplicate entry"
PREV_LINK_BROKEN = "prev link broken"
COLUMNS_MISMATCH = "indexed columns do not match the entry body"
ENTRY_EDITED = "entry edited: stored hash does not match its contents"
TRUNCATED = "ledger truncated"
FORKED = "ledger forked"
MERKLE_LEAF_MISMATCH = "Merkle leaf does not match the entry"
MERKLE_TREE_MISMATCH = "stored Merkle tree does not match the entries"


class RawRow(NamedTuple):
    """One stored entry as it sits in the database: indexed columns plus raw bytes."""

    seq: int
    ts: int
    kind: str
    actor: str
    subject: str
    body: bytes
    prev: bytes
    hash: bytes


class TreeRow(NamedTuple):
    """One stored Merkle tree node: the complete subtree at (level, idx); level 0 = leaf."""

    level: int
    idx: int
    hash: bytes


@dataclass(frozen=True)
class TreeCheck:
    """The stored Merkle tree, to check alongside the chain.

    `rows` must come in the order appends complete them: for each seq, the leaf
    (0, seq) and then every stored node that leaf completes, lowest level first (what
    `MerkleFrontier.append` returns, keeping only the tile levels of ledger/tiles.py).
    Rows past the last entry are not read.
    """

    tree_hash: TreeHash
    rows: Iterable[TreeRow]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification. On failure `entries` and `head_hash` describe the
    good prefix before `first_bad_seq`; `merkle_root` (when the tree was checked) is
    the root recomputed from the good prefix's bodies."""

    ok: bool
    entries: int
    head_hash: bytes | None
    first_bad_seq: int | None
    problem: str | None
    merkle_root: bytes | None = None


def row_problem(row: RawRow, expected_seq: int, expected_prev: bytes) -> tuple[int, str] | None:
    """The first thing wrong with `row` as (seq to blame, problem), or None."""
    if row.seq > expected_seq:
        return expected_seq, f"{MISSING_ENTRY}: expected seq {expected_seq}, found seq {row.seq}"
    if row.seq < expected_seq:
        return row.seq, f"{REORDERED_ENTRY}: seq {row.seq} comes after seq {expected_seq - 1}"
    if row.prev != expected_prev:
        what = "32 zero bytes (genesis)" if expected_seq == 0 else "the previous entry's hash"
        return row.seq, f"{PREV_LINK_BROKEN}: prev is not {what}"
    try:
        prefix = header_prefix(row.seq, row.ts, row.kind, row.actor, row.subject)
    except EntryError as exc:
        return row.seq, f"{COLUMNS_MISMATCH}: {exc}"
    if not row.body.startswith(prefix):
        return row.seq, COLUMNS_MISMATCH
    if chain_hash(row.prev, row.body) != row.hash:
        return row.seq, ENTRY_EDITED
    return None


def _tree_problem(completed: list[tuple[int, int, bytes]], stored: Iterator[TreeRow]) -> str | None:
    """Compare the nodes one leaf completes with the next stored tree rows (the store
    keeps only the nodes on tile levels; the others are hashed up from those)."""
    for level, idx, want in completed:
        if level % TILE_HEIGHT:
            continue
        got = next(stored, None)
        if got is not None and got.hash == want and got.level == level and got.idx == idx:
            continue
        what = "leaf" if level == 0 else f"node (level {level}, index {idx})"
        if got is None or (got.level, got.idx) != (level, idx):
            found = "" if got is None else f" (found level {got.level}, index {got.idx})"
            base = MERKLE_LEAF_MISMATCH if level == 0 else MERKLE_TREE_MISMATCH
            return f"{base}: the {what} is missing{found}"
        if level == 0:
            return MERKLE_LEAF_MISMATCH
        return f"{MERKLE_TREE_MISMATCH}: {what} differs from the hash of its children"
    return None


@dataclass(frozen=True)
class VerifyStart:
    """Where a verification resumes: `count` entries already verified (so the first row
    must be seq `count`), the last one's hash, and the Merkle tree's right edge at that
    size (`MerkleFrontier.subtrees`; only read when a tree is checked)."""

    count: int
    prev_hash: bytes
    subtrees: tuple[bytes, ...] = ()


def verify_chain(
    rows: Iterable[RawRow],
    expected_head: tuple[int, bytes] | None = None,
    tree: TreeCheck | None = None,
    start: VerifyStart | None = None,
) -> VerifyResult:
    """Check that `rows` (in stored order) form one unbroken chain from genesis.

    Per row, in order: seq is exactly the previous seq + 1 (the first is 0); `prev` is
    the previous row's hash (32 zero bytes for seq 0); the body starts with the
    canonical encoding of the indexed columns; the stored hash is the chain hash of
    `prev` and body.

    A chain alone cannot show that entries were cut off at the end. `expected_head`
    = (seq, hash) of an entry known from elsewhere (a signed checkpoint, an earlier
    audit) closes that gap: the ledger must contain that entry with that hash.

    With `tree`, each row's stored Merkle leaf must also equal HASH(0x00 || body), and
    every stored node completed by that leaf must equal the node recomputed from the
    bodies (so the root of every size computed from stored nodes is the true one: the
    nodes that are not stored are hashed up from stored ones).

    With `start`, the first `start.count` entries are taken as verified already (the
    parallel verifier resumes here after a damaged segment): `rows` and `tree.rows`
    begin at seq `start.count`, and the result counts and roots the whole ledger.
    """
    count = 0 if start is None else start.count
    prev_hash = GENESIS_PREV if start is None else start.prev_hash
    head: bytes | None = None if start is None or not count else prev_hash
    trusted_seq, trusted_hash = expected_head if expected_head is not None else (-1, b"")
    frontier = (
        None
        if tree is None
        else MerkleFrontier(tree.tree_hash, count, start.subtrees if start else ())
    )
    stored = iter(tree.rows) if tree is not None else iter(())

    def result(ok: bool, bad_seq: int | None = None, problem: str | None = None) -> VerifyResult:
        root = frontier.root() if frontier is not None else None
        return VerifyResult(ok, count, head, bad_seq, problem, root)

    for row in rows:
        found = row_problem(row, count, prev_hash)
        if found is not None:
            return result(False, found[0], found[1])
        if row.seq == trusted_seq and row.hash != trusted_hash:
            problem = (
                f"{FORKED}: seq {row.seq} has hash {row.hash.hex()}, "
                f"a trusted head says {trusted_hash.hex()}"
            )
            return result(False, row.seq, problem)
        if tree is not None and frontier is not None:
            completed = frontier.completed_by(tree.tree_hash.leaf(row.body))
            tree_problem = _tree_problem(completed, stored)
            if tree_problem is not None:
                return result(False, row.seq, tree_problem)
            frontier.advance(completed)
        count += 1
        prev_hash = row.hash
        head = row.hash
    if expected_head is not None and count <= trusted_seq:
        return result(False, count, truncated_problem(trusted_seq))
    return result(True)


def truncated_problem(trusted_seq: int) -> str:
    return f"{TRUNCATED}: it ends before seq {trusted_seq}, which a trusted head names"


# -- segments, for verifying in parallel ------------------------------------------------

StoredRow = tuple[int, int, str, str, str, bytes, bytes, bytes]
"""A stored entry row as the driver returns it: (seq, ts, kind, actor, subject, body,
prev, hash), the fields of `RawRow`."""


@dataclass(frozen=True)
class SegmentCheck:
    """What one worker found in the entries [start, stop): enough for the parent to join
    the seams (`first_prev` must be the hash before `start`) and finish the Merkle tree
    (`subtrees`: the right edge of the segment's own tree, one root for a full
    segment). `damaged` says only *that* something is wrong; the parent re-verifies
    from `start` in one process to say exactly what and where, as `verify_chain` does."""

    start: int
    stop: int
    first_prev: bytes | None
    last_hash: bytes | None
    subtrees: tuple[bytes, ...]
    damaged: bool


def check_segment(
    tree_hash: TreeHash,
    start: int,
    stop: int,
    batches: Iterable[tuple[list[StoredRow], dict[tuple[int, int], bytes]]],
    expected_head: tuple[int, bytes] | None = None,
) -> SegmentCheck:
    """Check entries [start, stop) and the stored tree nodes inside them.

    `start` must be a multiple of a power of two at least `stop - start` (the segment is
    one aligned subtree, or the start of one). `batches` gives the rows in seq order,
    each batch with the stored nodes completed by its leaves, keyed by (level, index)
    (only the tile levels of ledger/tiles.py are stored and compared).
    Every check of `verify_chain` is made, except the two that need the entry before
    `start` (its `prev` link, checked by the caller with `first_prev`) and the nodes
    above the segment (checked by the caller from the segments' roots).
    """
    digest, leaf_prefix, node_prefix = tree_hash.digest, LEAF_PREFIX, NODE_PREFIX
    chain, domain = blake3.blake3, CHAIN_DOMAIN
    pack = msgpack.Packer().pack  # ints only: the canonical (shortest) forms
    trusted_seq, trusted_hash = expected_head if expected_head is not None else (-1, b"")
    names: dict[tuple[str, str, str], bytes] = {}
    stack: list[bytes] = []
    expected, first_prev, last = start, None, None

    def outcome(damaged: bool) -> SegmentCheck:
        return SegmentCheck(start, stop, first_prev, last, tuple(stack), damaged)

    for rows, nodes in batches:
        for seq, ts, kind, actor, subject, body, prev, stored_hash in rows:
            if seq != expected:
                return outcome(True)
            if last is None:
                first_prev = prev
            elif prev != last:
                return outcome(True)
            # Columns: the body must start with 0x96, enc(seq), enc(ts), enc(kind, actor,
            # subject); the three names are checked and encoded once per distinct triple.
            key = (kind, actor, subject)
            tail = names.get(key)
            if tail is None:
                try:
                    check_header(0, 0, kind, actor, subject)
                except EntryError:
                    return outcome(True)
                tail = pack(key)[1:]
                if len(names) < 65536:
                    names[key] = tail
            if type(ts) is not int or not 0 <= ts <= MAX_INT64:
                return outcome(True)
            numbers = pack((seq, ts))[1:]
            if (
                body[:1] != BODY_ARRAY_HEADER
                or not body.startswith(numbers, 1)
                or not body.startswith(tail, 1 + len(numbers))
            ):
                return outcome(True)
            if chain(domain + prev + body).digest() != stored_hash:
                return outcome(True)
            if seq == trusted_seq and stored_hash != trusted_hash:
                return outcome(True)
            # The Merkle leaf and the nodes it completes inside the segment.
            node = digest(leaf_prefix + body)
            if nodes.get((0, seq)) != node:
                return outcome(True)
            idx, level = seq - start, 0
            while idx & 1:
                node = digest(node_prefix + stack.pop() + node)
                level += 1
                idx >>= 1
                if not level % TILE_HEIGHT and nodes.get((level, (start >> level) + idx)) != node:
                    return outcome(True)
            stack.append(node)
            last = stored_hash
            expected += 1
    return outcome(expected != stop)

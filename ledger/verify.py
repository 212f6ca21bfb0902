"""Streaming verification of a ledger's hash chain (pure, no I/O).

Works on raw stored rows, one at a time, in O(1) memory, and never decodes a payload:
each check compares bytes. It stops at the first bad row and names it, because every
later hash depends on that one and would only repeat the same finding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from ledger.entry import GENESIS_PREV, chain_hash, header_prefix
from ledger.errors import EntryError

# The problems, worded for the person reading the report. Details follow after ": ".
MISSING_ENTRY = "missing entry"
REORDERED_ENTRY = "reordered/duplicate entry"
PREV_LINK_BROKEN = "prev link broken"
COLUMNS_MISMATCH = "indexed columns do not match the entry body"
ENTRY_EDITED = "entry edited: stored hash does not match its contents"
TRUNCATED = "ledger truncated"
FORKED = "ledger forked"


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


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification. On failure `entries` and `head_hash` describe the
    good prefix before `first_bad_seq`."""

    ok: bool
    entries: int
    head_hash: bytes | None
    first_bad_seq: int | None
    problem: str | None


def _row_problem(row: RawRow, expected_seq: int, expected_prev: bytes) -> tuple[int, str] | None:
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


def verify_chain(
    rows: Iterable[RawRow], expected_head: tuple[int, bytes] | None = None
) -> VerifyResult:
    """Check that `rows` (in stored order) form one unbroken chain from genesis.

    Per row, in order: seq is exactly the previous seq + 1 (the first is 0); `prev` is
    the previous row's hash (32 zero bytes for seq 0); the body starts with the
    canonical encoding of the indexed columns; the stored hash is the chain hash of
    `prev` and body.

    A chain alone cannot show that entries were cut off at the end. `expected_head`
    = (seq, hash) of an entry known from elsewhere (a signed checkpoint, an earlier
    audit) closes that gap: the ledger must contain that entry with that hash.
    """
    count = 0
    prev_hash = GENESIS_PREV
    head: bytes | None = None
    trusted_seq, trusted_hash = expected_head if expected_head is not None else (-1, b"")
    for row in rows:
        found = _row_problem(row, count, prev_hash)
        if found is not None:
            return VerifyResult(False, count, head, found[0], found[1])
        if row.seq == trusted_seq and row.hash != trusted_hash:
            problem = (
                f"{FORKED}: seq {row.seq} has hash {row.hash.hex()}, "
                f"a trusted head says {trusted_hash.hex()}"
            )
            return VerifyResult(False, count, head, row.seq, problem)
        count += 1
        prev_hash = row.hash
        head = row.hash
    if expected_head is not None and count <= trusted_seq:
        problem = f"{TRUNCATED}: it ends before seq {trusted_seq}, which a trusted head names"
        return VerifyResult(False, count, head, count, problem)
    return VerifyResult(True, count, head, None, None)

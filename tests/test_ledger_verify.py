"""Chain verification on in-memory rows: one case per kind of damage."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from ledger.entry import Entry, chain_hash, make_entry
from ledger.verify import (
    COLUMNS_MISMATCH,
    ENTRY_EDITED,
    FORKED,
    MISSING_ENTRY,
    PREV_LINK_BROKEN,
    REORDERED_ENTRY,
    TRUNCATED,
    RawRow,
    verify_chain,
)

TS = 1_700_000_000_000_000_000


def make_rows(n: int) -> list[RawRow]:
    rows: list[RawRow] = []
    prev: Entry | None = None
    for i in range(n):
        prev = make_entry(prev, TS + i, "device.status", f"dev-{i % 3}", f"device:dev-{i % 3}",
                          {"i": i, "blob": bytes([i]) * i, "ok": i % 2 == 0})  # fmt: skip
        rows.append(RawRow(prev.seq, prev.ts, prev.kind, prev.actor, prev.subject,
                           prev.body, prev.prev, prev.hash))  # fmt: skip
    return rows


def test_intact_chain_is_ok() -> None:
    rows = make_rows(10)
    result = verify_chain(rows)
    assert result.ok
    assert (result.entries, result.head_hash) == (10, rows[-1].hash)
    assert (result.first_bad_seq, result.problem) == (None, None)


def test_empty_chain_is_ok_with_no_head() -> None:
    result = verify_chain([])
    assert result.ok and result.entries == 0 and result.head_hash is None


def test_streams_without_materialising_the_rows() -> None:
    def generate() -> Iterator[RawRow]:
        yield from make_rows(50)

    assert verify_chain(generate()).entries == 50


def test_missing_middle_entry() -> None:
    rows = make_rows(6)
    del rows[3]
    result = verify_chain(rows)
    assert not result.ok
    assert result.first_bad_seq == 3
    assert result.problem is not None and result.problem.startswith(MISSING_ENTRY)
    assert (result.entries, result.head_hash) == (3, rows[2].hash)


def test_missing_genesis() -> None:
    result = verify_chain(make_rows(3)[1:])
    assert (result.first_bad_seq, result.entries, result.head_hash) == (0, 0, None)
    assert result.problem is not None and result.problem.startswith(MISSING_ENTRY)


def test_duplicate_entry() -> None:
    rows = make_rows(4)
    rows.insert(3, rows[2])
    result = verify_chain(rows)
    assert result.first_bad_seq == 2
    assert result.problem is not None and result.problem.startswith(REORDERED_ENTRY)


def test_reordered_entries() -> None:
    rows = make_rows(5)
    rows[2], rows[3] = rows[3], rows[2]
    result = verify_chain(rows)
    # seq 3 arriving where 2 belongs looks like 2 is missing: the first thing wrong.
    assert result.first_bad_seq == 2
    assert result.problem is not None and result.problem.startswith(MISSING_ENTRY)


def test_prev_link_broken() -> None:
    rows = make_rows(5)
    bad_prev = b"\x07" * 32
    # A consistent forgery of one entry: right body and hash, but chained elsewhere.
    rows[2] = rows[2]._replace(prev=bad_prev, hash=chain_hash(bad_prev, rows[2].body))
    result = verify_chain(rows)
    assert result.first_bad_seq == 2
    assert result.problem is not None and result.problem.startswith(PREV_LINK_BROKEN)


def test_genesis_prev_must_be_zero() -> None:
    rows = make_rows(2)
    rows[0] = rows[0]._replace(prev=b"\x01" * 32)
    result = verify_chain(rows)
    assert result.first_bad_seq == 0
    assert result.problem is not None and result.problem.startswith(PREV_LINK_BROKEN)


def test_indexed_column_changed() -> None:
    rows = make_rows(5)
    rows[4] = rows[4]._replace(subject="device:someone-else")
    result = verify_chain(rows)
    assert (result.first_bad_seq, result.problem) == (4, COLUMNS_MISMATCH)


def test_indexed_column_made_invalid() -> None:
    rows = make_rows(3)
    rows[1] = rows[1]._replace(kind="NOT A KIND")
    result = verify_chain(rows)
    assert result.first_bad_seq == 1
    assert result.problem is not None and result.problem.startswith(COLUMNS_MISMATCH)


def test_body_edited() -> None:
    rows = make_rows(5)
    body = bytearray(rows[3].body)
    body[-1] ^= 0x01
    rows[3] = rows[3]._replace(body=bytes(body))
    result = verify_chain(rows)
    assert (result.first_bad_seq, result.problem) == (3, ENTRY_EDITED)


def test_stored_hash_edited() -> None:
    rows = make_rows(3)
    rows[2] = rows[2]._replace(hash=b"\x00" * 32)
    result = verify_chain(rows)
    assert (result.first_bad_seq, result.problem) == (2, ENTRY_EDITED)


def test_expected_head_detects_truncation_and_fork() -> None:
    rows = make_rows(6)
    assert verify_chain(rows, expected_head=(5, rows[5].hash)).ok
    assert verify_chain(rows, expected_head=(2, rows[2].hash)).ok
    cut = verify_chain(rows[:4], expected_head=(5, rows[5].hash))
    assert not cut.ok and cut.problem is not None and cut.problem.startswith(TRUNCATED)
    assert cut.first_bad_seq == 4
    forked = verify_chain(rows, expected_head=(3, b"\x09" * 32))
    assert not forked.ok and forked.first_bad_seq == 3
    assert forked.problem is not None and forked.problem.startswith(FORKED)


ROWS = make_rows(8)


@given(st.data())
def test_any_single_flipped_body_byte_is_detected(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(ROWS) - 1), label="row")
    row = ROWS[index]
    position = data.draw(st.integers(0, len(row.body) - 1), label="byte")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    body = bytearray(row.body)
    body[position] ^= mask
    rows = list(ROWS)
    rows[index] = row._replace(body=bytes(body))
    result = verify_chain(rows)
    assert not result.ok
    assert result.first_bad_seq == index
    assert result.problem in (COLUMNS_MISMATCH, ENTRY_EDITED)

"""GroupCommitter: concurrent asyncio appenders, few transactions, errors kept apart."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Connection, text

from ledger.entry import Entry
from ledger.errors import EntryError, StoreError
from ledger.storage.group_commit import GroupCommitter
from ledger.storage.store import ApplyCallback, LedgerStore, NewEvent


@pytest.fixture
def store(ledger_url: str) -> Iterator[LedgerStore]:
    opened = LedgerStore.open(ledger_url)
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[LedgerStore]:
    opened = LedgerStore.open(tmp_path / "ledger.db")
    yield opened
    opened.close()


def count_transactions(monkeypatch: pytest.MonkeyPatch, store: LedgerStore) -> list[int]:
    """Instrument `store.append_many`: the returned list gets each call's event count."""
    calls: list[int] = []
    real = store.append_many

    def counted(events: Sequence[NewEvent], apply: ApplyCallback | None = None) -> list[Entry]:
        calls.append(len(events))
        return real(events, apply)

    monkeypatch.setattr(store, "append_many", counted)
    return calls


def event(i: int, **payload: object) -> NewEvent:
    return NewEvent("device.status", f"dev-{i}", f"device:dev-{i}", {"i": i, **payload})


def make_projection(store: LedgerStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE projection (seq INTEGER, actor TEXT)"))


def project(conn: Connection, entries: list[Entry]) -> None:
    for e in entries:
        conn.execute(text("INSERT INTO projection VALUES (:s, :a)"), {"s": e.seq, "a": e.actor})


async def test_concurrent_appenders_share_transactions(
    store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_transactions(monkeypatch, store)
    async with GroupCommitter(store) as committer:
        entries = await asyncio.gather(*(committer.append(event(i)) for i in range(200)))
    assert sorted(e.seq for e in entries) == list(range(200))
    # Each caller got its own entry back, in call order.
    assert [e.payload["i"] for e in entries] == list(range(200))
    assert [e.seq for e in entries] == list(range(200))
    assert store.verify().ok and store.count() == 200
    assert sum(calls) == 200 and len(calls) <= 10, calls
    assert committer.transactions == len(calls)


async def test_appends_arriving_during_a_write_form_the_next_batch(
    sqlite_store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_transactions(monkeypatch, sqlite_store)
    committer = GroupCommitter(sqlite_store, max_batch=50)
    first = asyncio.create_task(committer.append(event(0)))
    await asyncio.sleep(0)  # the first append is queued and its write has started
    rest = [asyncio.create_task(committer.append(event(i))) for i in range(1, 121)]
    await asyncio.gather(first, *rest)
    await committer.close()
    assert calls[0] == 1  # a lone appender is not kept waiting for company
    assert sum(calls) == 121 and max(calls) <= 50 and len(calls) <= 6, calls
    assert sqlite_store.verify().ok


async def test_a_failing_apply_fails_only_its_caller(store: LedgerStore) -> None:
    make_projection(store)

    class Refused(Exception):
        pass

    def refuse(conn: Connection, entries: list[Entry]) -> None:
        project(conn, entries)
        raise Refused("command rejected")

    async with GroupCommitter(store) as committer:
        results = await asyncio.gather(
            *(committer.append(event(i), refuse if i == 17 else project) for i in range(40)),
            return_exceptions=True,
        )
    assert isinstance(results[17], Refused)
    good = [r for i, r in enumerate(results) if i != 17]
    assert all(isinstance(r, Entry) for r in good)
    assert store.count() == 39 and store.verify().ok
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, actor FROM projection ORDER BY seq")).all()
    assert rows == [(e.seq, e.actor) for e in good if isinstance(e, Entry)]
    assert "dev-17" not in {e.actor for e in store.iter_entries()}


async def test_a_bad_event_fails_only_its_caller(
    sqlite_store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_transactions(monkeypatch, sqlite_store)
    async with GroupCommitter(sqlite_store) as committer:
        # Checked before batching: the caller hears at once, nothing is written.
        with pytest.raises(EntryError, match="kind"):
            await committer.append(NewEvent("Bad Kind", "hub", "s", {}))
        assert calls == []
        # Found only when encoded: that caller fails, its batch is written without it.
        results = await asyncio.gather(
            *(committer.append(event(i, x=math.nan if i == 5 else 1.5)) for i in range(30)),
            return_exceptions=True,
        )
    assert isinstance(results[5], EntryError) and "NaN" in str(results[5])
    assert sum(isinstance(r, Entry) for r in results) == 29
    assert sqlite_store.count() == 29 and sqlite_store.verify().ok
    assert len(calls) <= 3, calls  # the failed batch, its retry: no one-by-one fallback


async def test_append_many_stays_contiguous_and_batches_are_bounded(
    sqlite_store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_transactions(monkeypatch, sqlite_store)
    async with GroupCommitter(sqlite_store, max_batch=10) as committer:
        groups = [[event(100 * g + k) for k in range(4)] for g in range(6)]
        singles = [committer.append(event(i)) for i in range(20)]
        big = [event(900 + k) for k in range(25)]  # larger than max_batch: written alone
        results = await asyncio.gather(
            *(committer.append_many(g) for g in groups), committer.append_many(big), *singles
        )
    for written in results[:7]:
        assert isinstance(written, list)
        seqs = [e.seq for e in written]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert 25 in calls
    assert all(n <= 10 for n in calls if n != 25), calls
    assert sqlite_store.verify().ok and sqlite_store.count() == 24 + 25 + 20


async def test_a_storage_failure_fails_the_whole_batch(
    sqlite_store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(events: Sequence[NewEvent], apply: ApplyCallback | None = None) -> list[Entry]:
        raise StoreError("cannot append to ledger: disk I/O error")

    monkeypatch.setattr(sqlite_store, "append_many", broken)
    async with GroupCommitter(sqlite_store) as committer:
        results = await asyncio.gather(
            *(committer.append(event(i)) for i in range(5)), return_exceptions=True
        )
    assert all(isinstance(r, StoreError) and "disk I/O" in str(r) for r in results)
    assert len({id(r) for r in results}) == 5  # each caller its own exception object


async def test_close_writes_what_is_queued_then_refuses(sqlite_store: LedgerStore) -> None:
    committer = GroupCommitter(sqlite_store)
    queued = [asyncio.create_task(committer.append(event(i))) for i in range(10)]
    await asyncio.sleep(0)
    await committer.close()
    assert [t.result().seq for t in queued] == list(range(10))
    with pytest.raises(StoreError, match="closed"):
        await committer.append(event(99))
    assert sqlite_store.count() == 10


async def test_a_caller_cancelled_while_queued_appends_nothing(
    sqlite_store: LedgerStore,
) -> None:
    async with GroupCommitter(sqlite_store) as committer:
        first = asyncio.create_task(committer.append(event(0)))
        await asyncio.sleep(0)  # the first batch is being written
        withdrawn = asyncio.create_task(committer.append(event(1)))
        kept = asyncio.create_task(committer.append(event(2)))
        await asyncio.sleep(0)
        withdrawn.cancel()
        await asyncio.gather(first, kept)
    assert [e.actor for e in sqlite_store.iter_entries()] == ["dev-0", "dev-2"]

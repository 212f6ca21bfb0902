"""Leadership among several hub processes on one PostgreSQL (hub/commands/leadership.py),
in one test process: the lease, the fence inside the append's transaction, the writer
lock across processes (two engines stand for two processes), telemetry flushes of a
deposed leader, and the SQLite single-process lock. The same with real `hub serve`
processes, SIGKILL and SIGSTOP: tests/test_hub_leader.py."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from hub import events as ev
from hub import fold
from hub.commands.leadership import (
    AlreadyServing,
    Fenced,
    Leadership,
    Lease,
    SingleProcessLock,
    WriteLock,
)
from hub.commands.writer import LedgerWriter
from hub.telemetry.ingest import FlushResult, TelemetryIngest
from ledger.storage.store import LedgerStore, NewEvent

pytestmark = pytest.mark.timeout(60)


def event(n: int) -> NewEvent:
    return NewEvent(ev.OPERATOR_ADDED, "test", f"operator/x{n}",
                    {"name": f"x{n}", "keyid": f"k{n}", "public": b"\0" * 32,
                     "roles": ["admin"]})


def hub_store(url: str) -> LedgerStore:
    store = LedgerStore.open(url)
    with store.engine.begin() as conn:
        fold.create_tables(conn)
    return store


async def _nothing(*_args: object) -> None:
    return None


def leading(engine: Engine, name: str, lease_s: float) -> tuple[Lease, Leadership]:
    """A lease and a leadership as one hub process holds them (no lease loop)."""
    lease = Lease(engine, lease_s, holder=(f"{name}:1:x", name, 1))
    return lease, Leadership(lease, _nothing, _nothing)


def expire(engine: Engine) -> None:
    """Let the current lease run out now (instead of sleeping through it)."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE hub_leader SET expires = 0"))


def test_one_lease_holder_and_a_takeover_with_a_new_epoch(fresh_pg_url: str) -> None:
    with hub_store(fresh_pg_url) as store:
        a, _ = leading(store.engine, "a", 30)
        b, _ = leading(store.engine, "b", 30)
        assert a.acquire() == 1
        assert b.acquire() is None  # held, not expired
        assert a.renew(1)
        info = b.leader()
        assert info is not None and info.epoch == 1 and info.host == "a"
        assert 25 < info.expires_in_s <= 30
        expire(store.engine)
        assert b.acquire() == 2
        assert not a.renew(1)  # the deposed leader learns it from its next renewal
        assert a.acquire() is None
        b.release(2)  # a clean stop: the next one need not wait the lease out
        assert a.acquire() == 3


async def test_a_deposed_leader_cannot_append_and_operators_still_can(
    fresh_pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with hub_store(fresh_pg_url) as store:
        old_lease, old = leading(store.engine, "old", 30)
        new_lease, new = leading(store.engine, "new", 30)
        old.epoch, old.valid_until = old_lease.acquire(), math.inf  # it believes it leads
        old_writer = LedgerWriter(store)
        old_writer.leadership = old
        assert await old_writer.write([event(0)], leader=True)
        expire(store.engine)  # e.g. it was paused past its lease (SIGSTOP)
        new.epoch, new.valid_until = new_lease.acquire(), math.inf
        assert new.epoch == 2
        before = store.count()
        # Its own clock says the lease still holds: only the database can refuse it.
        with pytest.raises(Fenced, match="epoch 2"):
            await old_writer.write([event(1)], leader=True)
        with pytest.raises(Fenced):
            await old_writer.write([event(2)], leader=True)
        assert store.count() == before  # refused inside the transaction: nothing appended
        assert old.fenced == 2
        fenced_lines = [r for r in caplog.records if "fenced" in r.getMessage()]
        assert len(fenced_lines) == 1  # logged once
        # Operator commands are not leader work: any process appends them.
        assert await old_writer.write([event(3)])
        new_writer = LedgerWriter(store)
        new_writer.leadership = new
        assert await new_writer.write([event(4)], leader=True)
        assert store.verify().ok
        old_writer.lock.close()
        new_writer.lock.close()


async def test_a_standby_refuses_leader_work_without_asking_the_database(
    fresh_pg_url: str,
) -> None:
    with hub_store(fresh_pg_url) as store:
        _, standby = leading(store.engine, "s", 30)
        writer = LedgerWriter(store)
        writer.leadership = standby
        with pytest.raises(Fenced, match="not the leader"):
            await writer.write([event(0)], leader=True)
        assert store.count() == 0
        # A leader whose lease ran out on its own clock (not renewed in time) stops too.
        standby.epoch, standby.valid_until = 7, time.monotonic() - 1
        with pytest.raises(Fenced, match="ran out"):
            await writer.write([event(0)], leader=True)
        writer.lock.close()


def test_the_epoch_bump_waits_for_an_append_in_flight(fresh_pg_url: str) -> None:
    """The append that read the old epoch commits before the new leader holds its epoch:
    the new leader then sees it (no decision of the old leader lands after a takeover)."""
    with hub_store(fresh_pg_url) as store:
        old, _ = leading(store.engine, "old", 30)
        new, _ = leading(store.engine, "new", 30)
        assert old.acquire() == 1
        expire(store.engine)
        in_fence = threading.Event()
        release = threading.Event()

        def slow_apply(conn: object, _entries: object) -> None:
            from hub.commands.leadership import fence
            fence(conn, 1)  # type: ignore[arg-type]
            in_fence.set()
            release.wait(10)

        appender = threading.Thread(target=lambda: store.append_many([event(0)], slow_apply))
        appender.start()
        assert in_fence.wait(10)
        taken: list[int | None] = []
        taker = threading.Thread(target=lambda: taken.append(new.acquire()))
        taker.start()
        taker.join(0.5)
        assert taker.is_alive()  # waits for the append's FOR SHARE
        release.set()
        appender.join(10)
        taker.join(10)
        assert taken == [2] and store.count() == 1


async def test_the_writer_lock_holds_across_processes(fresh_pg_url: str) -> None:
    with LedgerStore.open(fresh_pg_url) as one, LedgerStore.open(fresh_pg_url) as two:
        a, b = WriteLock(one.engine), WriteLock(two.engine)
        entered = asyncio.Event()

        async def other() -> None:
            async with b:
                entered.set()

        async with a:
            task = asyncio.create_task(other())
            await asyncio.sleep(0.5)
            assert not entered.is_set()  # the other "process" waits for the lock
        await asyncio.wait_for(entered.wait(), 10)
        await task
        a.close()
        b.close()


def test_two_processes_counting_the_same_windows_count_each_once(fresh_pg_url: str) -> None:
    """Every hub process counts telemetry (the shared intake), no fence: two processes
    that both got the same windows (a redelivery after an ack wait) and flush at the same
    moment count each window once, and the totals add up across processes."""
    from edge_agent import protocol as proto

    def window(seq: int, device: str = "d1") -> proto.TelemetryWindow:
        return proto.TelemetryWindow(
            device=device, boot="b", seq=seq, model="m", version="1", digest="ab" * 32,
            start=1, end=2 + seq, count=5, errors=seq % 2, latency_ms_p50=1.0,
            latency_ms_p95=1.0, latency_ms_max=1.0, counter=1, latency_buckets=[5])

    with hub_store(fresh_pg_url) as store:
        a, b = (TelemetryIngest(store.engine, refresh_s=0.0) for _ in range(2))
        for round_ in range(5):
            seqs = range(round_ * 40, round_ * 40 + 40)
            for ingest in (a, b):  # both fetched the same windows, of two devices
                for seq in seqs:
                    assert ingest.offer(window(seq, f"d{seq % 2}"))
            own = [window(1000 + round_, "only-a")]  # and one each no other process has
            a.offer(own[0])
            b.offer(window(2000 + round_, "only-b"))
            start = threading.Barrier(2)
            results: list[FlushResult] = []

            def flush(ingest: TelemetryIngest, start: threading.Barrier = start,
                      results: list[FlushResult] = results) -> None:
                start.wait()
                results.append(ingest.flush())

            threads = [threading.Thread(target=flush, args=(i,)) for i in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sum(r.counted for r in results) == 40 + 2
            assert sum(r.duplicates for r in results) == 40
        fresh = TelemetryIngest(store.engine)  # what any process reads
        assert fresh.windows_total == 5 * 42 and fresh.duplicates_total == 5 * 40
        rows = {r["device"]: r for r in fresh.device_rows()}
        assert rows["d0"]["windows"] == rows["d1"]["windows"] == 100
        assert rows["d0"]["inferences"] == 500 and rows["d1"]["errors"] == 100
        assert rows["only-a"]["windows"] == rows["only-b"]["windows"] == 5
        assert a.counted_here + b.counted_here == 5 * 42
        assert a.windows_total == b.windows_total == 5 * 42  # every process shows the same


def test_a_second_hub_on_one_sqlite_ledger_is_refused(tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    first = SingleProcessLock.take(ledger)
    with pytest.raises(AlreadyServing, match="another `hub serve`"):
        SingleProcessLock.take(ledger)
    first.release()
    SingleProcessLock.take(ledger).release()  # free again once the first stops


async def test_the_lease_loop_leads_then_stands_by_when_deposed(fresh_pg_url: str) -> None:
    with hub_store(fresh_pg_url) as store:
        seen: list[str] = []

        async def lead(epoch: int) -> None:
            seen.append(f"lead {epoch}")

        async def follow() -> None:
            seen.append("follow")

        lease = Lease(store.engine, 0.6, holder=("a:1:x", "a", 1))
        leadership = Leadership(lease, lead, follow)
        task = asyncio.create_task(leadership.run())
        try:
            await asyncio.wait_for(_until(lambda: seen == ["lead 1"]), 10)
            assert leadership.leads() and leadership.status()["this"]["role"] == "leader"
            with store.engine.begin() as conn:  # another process took over
                conn.execute(text("UPDATE hub_leader SET epoch = 2, holder = 'b:2:y', "
                                  "expires = 1e12"))
            await asyncio.wait_for(_until(lambda: seen == ["lead 1", "follow"]), 10)
            assert not leadership.leads() and leadership.role == "standby"
            # Its heartbeat says so at its next beat (written after `follow` ran).
            await asyncio.wait_for(_until(lambda: [
                (p["holder"], p["role"]) for p in lease.processes()] == [("a:1:x", "standby")]),
                10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert lease.processes() == []  # a stopped process leaves the list


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.02)

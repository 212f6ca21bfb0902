"""ledger.supervisor: a failing task is logged once, restarted with backoff, its state
readable; a critical task that cannot work sets `fatal`. Pure asyncio, no server."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from ledger.supervisor import FAILED, RUNNING, STOPPED, Supervisor

pytestmark = pytest.mark.timeout(30)
log = logging.getLogger("test.supervisor")


async def test_a_failing_task_is_logged_once_and_restarted_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def flaky() -> None:
        runs.append(loop.time())
        if len(runs) <= 4:
            raise OSError("database or disk is full")
        await asyncio.Event().wait()  # then it works, until cancelled

    sup = Supervisor(log, backoff_s=0.05, backoff_max_s=0.1, stable_s=0.3)
    with caplog.at_level(logging.DEBUG, logger="test.supervisor"):
        sup.start("reports", flaky)
        while len(runs) < 5:
            await asyncio.sleep(0.01)
        state = sup.state("reports")
        assert state.state == RUNNING and state.restarts == 4
        assert state.last_error == "OSError: database or disk is full"
        gaps = [b - a for a, b in itertools.pairwise(runs)]
        assert gaps[0] >= 0.04 and gaps[2] >= 0.09 and gaps[3] < 0.5  # doubling, capped
        await asyncio.sleep(0.4)  # stable: the streak ends, said once
        await sup.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "reports failed: OSError" in errors[0].getMessage()
    assert any("running again after 4 failure(s)" in r.getMessage() for r in caplog.records)
    assert sup.states()[0]["state"] == STOPPED


async def test_a_critical_task_that_cannot_work_sets_fatal() -> None:
    async def broken() -> None:
        raise ConnectionError("the database is gone")

    sup = Supervisor(log, backoff_s=0.01, backoff_max_s=0.01, give_up_s=0.1,
                     give_up_failures=3)
    sup.start("checkpointer", broken)
    sup.start("metrics", broken, critical=False)
    await asyncio.wait_for(sup.fatal.wait(), 5)
    assert sup.state("checkpointer").state == FAILED
    assert "checkpointer failed" in sup.fatal_reason and "database is gone" in sup.fatal_reason
    assert sup.state("metrics").state != FAILED  # not critical: restarted for ever
    await sup.stop()


async def test_a_task_cancelled_from_inside_is_restarted() -> None:
    runs = 0

    async def cancels_itself() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise asyncio.CancelledError
        await asyncio.Event().wait()

    sup = Supervisor(log, backoff_s=0.01)
    sup.start("rollouts", cancels_itself)
    while runs < 2:
        await asyncio.sleep(0.01)
    assert sup.state("rollouts").restarts == 1 and sup.state("rollouts").state == RUNNING
    await sup.stop()


async def test_a_fatal_error_stops_the_task_at_once_and_is_kept() -> None:
    class Evidence(Exception):
        pass

    runs = 0

    async def forked() -> None:
        nonlocal runs
        runs += 1
        raise Evidence("two checkpoints of one size")

    sup = Supervisor(log, backoff_s=0.01, fatal_errors=(Evidence,))
    sup.start("follow", forked)
    await asyncio.wait_for(sup.fatal.wait(), 5)
    await asyncio.sleep(0.05)
    assert runs == 1  # never retried: evidence is not a transient failure
    assert isinstance(sup.fatal_error, Evidence)
    assert sup.state("follow").state == FAILED
    assert "two checkpoints of one size" in sup.fatal_reason
    await sup.stop()

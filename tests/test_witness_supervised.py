"""`ledger witness` follows under the supervisor (issue 13, item 1): an unexpected error
in the follower is logged once and the follower restarts, with one subscription, not
one more per restart. Pure: a stand-in for the hub's ledger API, no server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ledger.net.remote import RemoteError
from ledger.net.witness_runner import WitnessRunner
from ledger.supervisor import RUNNING, Supervisor

pytestmark = pytest.mark.timeout(30)


class Sub:
    def __init__(self, subs: list[Sub]) -> None:
        self.subs = subs
        subs.append(self)

    async def unsubscribe(self) -> None:
        self.subs.remove(self)


class FlakyHub:
    """The first catch-up fails with a bug-like error, later ones find no checkpoint."""

    def __init__(self) -> None:
        self.subs: list[Sub] = []
        self.calls = 0

    async def subscribe(self, subject: str, cb: Callable[[Any], Awaitable[None]]) -> Sub:
        return Sub(self.subs)

    async def checkpoint(self, size: int | None = None) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("unexpected reply shape")
        raise RemoteError("no checkpoint yet")


async def test_the_follower_restarts_after_an_unexpected_error_with_one_subscription(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = FlakyHub()
    said: list[str] = []
    runner = WitnessRunner(witness=None, client=hub, say=said.append)  # type: ignore[arg-type]
    log = logging.getLogger("test.witness")
    sup = Supervisor(log, backoff_s=0.01)
    with caplog.at_level(logging.ERROR, logger="test.witness"):
        sup.start("follow", runner.follow)
        while hub.calls < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        state = sup.state("follow")
        assert state.state == RUNNING and state.restarts == 1
        assert "ValueError: unexpected reply shape" in state.last_error
        assert len(hub.subs) == 1  # the failed run's subscription was removed
        assert said == ["no checkpoint to catch up on yet: no checkpoint yet"]
        await sup.stop()
    assert len(hub.subs) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "follow failed: ValueError: unexpected reply shape; restarting (failure 1 in a row)"]

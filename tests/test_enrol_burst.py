"""A burst of enrolments shares NATS users reloads (issue 17, 10,000 devices).

An enrolment is answered once the server has the device's NATS user, so it waits for
the users-file rewrite and reload after its commit. While it waits it must not hold one
of the hub's MAX_CONCURRENT_REQUESTS API slots: held, only that many enrolments could
commit per reload, and a reload of a 10,000-device users file takes seconds (the
fleet's enrolment was O(n^2)). Here the reload is held back: every enrolment of a burst
three times the slot count must still commit, and all are answered once it goes on."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import func, select

from hub.devices.state import DEVICES
from hub.home import nats_users
from hub.service.nats import MAX_CONCURRENT_REQUESTS
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(60)


def enrolled(fleet: Fleet) -> int:
    with fleet.hub.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(DEVICES)).scalar_one())


async def test_enrolments_waiting_for_the_reload_free_their_api_slots(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    go_on = threading.Event()
    calls: list[int] = []
    real = nats_users.apply_nats_users

    def held_back(*args: Any, **kwargs: Any) -> bool:
        calls.append(len(args[1]))  # devices in this rewrite
        go_on.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(nats_users, "apply_nats_users", held_back)
    burst = 3 * MAX_CONCURRENT_REQUESTS
    async with await fleet.client() as admin:
        answers = [asyncio.create_task(admin.call("device.enroll", {"device": f"burst-{i}"}))
                   for i in range(burst)]
        try:
            async def all_committed() -> None:
                while enrolled(fleet) < burst:
                    await asyncio.sleep(0.05)

            # Every enrolment commits while the first reload is still held back.
            await asyncio.wait_for(all_committed(), 20)
            assert not any(a.done() for a in answers)  # none answered before its reload
        finally:
            go_on.set()
        results = await asyncio.wait_for(asyncio.gather(*answers), 30)
    assert sorted(r["device"] for r in results) == sorted(f"burst-{i}" for i in range(burst))
    # The held rewrite, then at most one more that takes every enrolment after it.
    assert 1 <= len(calls) <= 2 and calls[-1] == burst

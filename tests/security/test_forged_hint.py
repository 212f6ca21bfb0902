"""A forged hint (issue 12, class 2): a device makes the server deliver a service
response onto another device's assignment subject inside the devices' account (a
reply-subject trick on a direct get it may send). The other device, a real agent, takes
it only as a hint: it reads its assignment again (a direct get, seen arriving in the
hub's account) and its installed model, its row in the hub and the ledger stay as they
were (edge_agent/transport/direct.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from edge_agent.protocol.names import ASSIGNMENTS_BUCKET
from edge_agent.transport.connect import NatsAuth
from edge_agent.transport.connect import connect as nats_connect
from edge_agent.transport.direct import RECHECKS
from hub import events as ev
from ledger.signing import SigningKey
from tests.fleet import Fleet
from tests.test_nats_permissions import Conn

pytestmark = pytest.mark.timeout(180)

WAIT = 10.0
SETTLE = 4.0  # how long dev-b is given to act on the hints (and re-check) before it is looked at
ASG = f"KV_{ASSIGNMENTS_BUCKET}"
HINTS = 20


@pytest.fixture
async def fleet_with_agent(fleet: Fleet, model_files: dict[str, Path]) -> AsyncIterator[Fleet]:
    async with await fleet.client() as client:
        await fleet.release_model(model_files["1"], "kws", "1")
        for device in ("dev-a", "dev-b"):
            await client.call("device.enroll", {"device": device})
        fleet.agent("dev-b").start()
        await client.call("deploy", {"model": "kws", "version": "1", "devices": ["dev-b"]})
        await fleet.feed.wait_for(
            lambda es: any(e.kind == ev.DEVICE_UPDATE_APPLIED and e.actor == "dev-b"
                           for e in es), timeout=60, what="dev-b to apply kws/1")
    yield fleet


async def test_a_forged_hint_costs_a_few_fetches_and_changes_nothing(
        fleet_with_agent: Fleet) -> None:
    fleet = fleet_with_agent
    spy = await nats_connect(fleet.nats_url, fleet.config.nats_auth("hub"), name="spy")
    fetches: list[Msg] = []

    async def count(msg: Msg) -> None:
        fetches.append(msg)

    # dev-b's direct gets of its assignment arrive in the hub's account (a service import).
    await spy.subscribe(f"$JS.API.DIRECT.GET.{ASG}.$KV.{ASSIGNMENTS_BUCKET}.dev-b", cb=count)
    await spy.flush()
    key = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    attacker = await Conn.open(fleet.nats_url, NatsAuth.for_device("dev-a",
                                                                   key.private_raw()), "dev-a")
    try:
        async with await fleet.client() as client:
            rows_before = {r["device"]: r for r in await client.devices()}
        entries_before = [e.kind for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED)]
        ledger_before = fleet.hub.store.count()
        slots = fleet.agent("dev-b").state_dir
        active_before = sorted(p.name for p in slots.rglob("*") if p.is_file()
                               and p.suffix == ".tflite")
        # A direct get of dev-a's own assignment (dev-a may send it), answered onto
        # dev-b's assignment subject inside the devices' account: dev-b's hint.
        for _ in range(HINTS):
            await attacker.nc.publish(
                f"$JS.API.DIRECT.GET.{ASG}.$KV.{ASSIGNMENTS_BUCKET}.dev-a", b"",
                reply=f"$KV.{ASSIGNMENTS_BUCKET}.dev-b")
        await attacker.nc.flush()

        async def fetched() -> None:
            while not fetches:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(fetched(), WAIT)  # the hints reached dev-b: it read again
        await asyncio.sleep(SETTLE)  # and whatever it would do with them, it has done
        # Coalesced: never more than a fetch per hint, and the re-checks after the last.
        assert 1 <= len(fetches) <= HINTS + len(RECHECKS)
        async with await fleet.client() as client:
            rows_after = {r["device"]: r for r in await client.devices()}
        for column in ("model", "version", "state", "counter"):
            assert rows_after["dev-b"].get(column) == rows_before["dev-b"].get(column)
        assert [e.kind for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED)] == entries_before
        lifecycle = (ev.DEVICE_UPDATE_APPLIED, ev.DEVICE_UPDATE_FAILED,
                     ev.DEVICE_UPDATE_REVERTED)
        assert not [e.kind for e in fleet.hub.store.iter_entries(ledger_before)
                    if e.kind in lifecycle], "dev-b reported an update"
        assert sorted(p.name for p in slots.rglob("*") if p.is_file()
                      and p.suffix == ".tflite") == active_before
        assert "update refused" not in fleet.agent("dev-b").log()
    finally:
        await attacker.close()
        with contextlib.suppress(Exception):
            await spy.close()

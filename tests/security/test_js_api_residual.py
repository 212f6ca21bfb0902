"""Class 2 of issue 12: the JetStream API as a write primitive (the two first findings).

nats-server writes a JetStream API response to the reply subject the caller names, and
a push consumer delivers to the `deliver_subject` its creator names, with the rights of
the account the call runs in. These two attacks from a stolen device bundle succeeded
while devices ran JetStream calls in the account that owns the hub's streams (they were
strict xfails); with NATS accounts (docs/PROTOCOL.md "Permissions") a device has no
JetStream there, and both fail. tests/security/test_accounts.py has every verb.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.js.errors import KeyNotFoundError

from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    LEDGER_ENTRY_SUBJECT,
    LEDGER_STREAM,
    ROOTS_BUCKET,
)
from edge_agent.transport.connect import NatsAuth
from ledger.signing import SigningKey
from tests.fleet import Fleet
from tests.test_nats_permissions import Conn

pytestmark = pytest.mark.timeout(60)

SETTLE = 3.0


async def unchanged_for(read: Callable[[], Awaitable[object]], before: object,
                        seconds: float) -> None:
    """`read()` still gives `before` throughout `seconds` (taken before the attack)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        now = await read()
        assert now == before, f"changed: {before!r} -> {now!r}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def device(fleet: Fleet) -> AsyncIterator[tuple[Fleet, Conn]]:
    """dev-a and dev-b enrolled, dev-b with an assignment; dev-a connected (its bundle)."""
    async with await fleet.client() as admin:
        for name in ("dev-a", "dev-b"):
            await admin.call("device.enroll", {"device": name})
    await (await fleet.hub.edge.js.key_value(ASSIGNMENTS_BUCKET)).put("dev-b", b"assignment")
    key = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    conn = await Conn.open(fleet.nats_url, NatsAuth.for_device("dev-a", key.private_raw()))
    try:
        yield fleet, conn
    finally:
        await conn.close()


async def test_a_device_cannot_overwrite_another_devices_assignment_with_an_api_response(
    device: tuple[Fleet, Conn],
) -> None:
    fleet, conn = device
    kv = await fleet.hub.edge.js.key_value(ASSIGNMENTS_BUCKET)

    async def value() -> object:
        try:
            return (await kv.get("dev-b")).value
        except KeyNotFoundError:
            return None

    before = await value()
    # Allowed to the device: STREAM.INFO on a bucket it reads. The reply is another
    # device's assignment key; the server writes its JSON answer there.
    await conn.nc.publish(f"$JS.API.STREAM.INFO.KV_{ROOTS_BUCKET}", b"",
                          reply=f"$KV.{ASSIGNMENTS_BUCKET}.dev-b")
    await conn.nc.flush()
    await unchanged_for(value, before, SETTLE)


async def test_a_device_cannot_write_into_the_ledger_feed_with_a_push_consumer(
    device: tuple[Fleet, Conn],
) -> None:
    fleet, conn = device
    js = fleet.hub.edge.js

    async def feed() -> object:
        return (await js.stream_info(LEDGER_STREAM)).state.messages

    before = await feed()
    # Allowed to the device: an (unfiltered) consumer on the roots bucket. Its deliver
    # subject is the ledger feed, which the LEDGER stream captures (a push consumer
    # delivers while someone listens there: the hub's checkpointer does).
    stream = f"KV_{ROOTS_BUCKET}"
    body = {"stream_name": stream, "config": {
        "deliver_subject": LEDGER_ENTRY_SUBJECT, "ack_policy": "none",
        "deliver_policy": "all"}}
    await conn.nc.publish(f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps(body).encode(),
                          reply="_INBOX.dev-a.x")
    await conn.nc.flush()
    await unchanged_for(feed, before, SETTLE)

"""Class 2 of issue 12, what is left: the JetStream API as a write primitive.

The hub no longer answers at a subject it owns (test_reply_subjects.py), but
nats-server itself still does: a JetStream API response goes to the reply subject the
caller names, written with the account's rights, and a push consumer delivers to the
`deliver_subject` its creator names. A device's NATS user may call a few JetStream API
subjects on the buckets it reads (hub/home/nats_config.device_permissions), in the same
account as the hub's streams, so a stolen device bundle can still write server-made
bytes (a JSON API response, a copy of a roots entry) to subjects it does not own.
Subject permissions cannot stop it; NATS accounts can (docs/SECURITY.md, "Out of
scope"). These tests are strict xfails: they pass, and so fail the suite, the day the
hub's streams move to an account no device runs JetStream calls in.
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

RESIDUAL = ("class 2 of issue 12: nats-server writes JetStream API responses and push "
            "deliveries to a subject the caller names, in the account that owns the "
            "hub's streams; closed only by NATS accounts (docs/SECURITY.md)")
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

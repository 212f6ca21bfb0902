"""Class 6 of issue 12: consumers a device may create or delete.

A stolen device bundle (its NATS user, on a real nats-server with the `hub init`
configuration) may create no consumer at all (a device reads with direct gets, in an
account without JetStream: docs/PROTOCOL.md "Permissions"), durable or not, and delete
none: not the hub's durable report consumer. Each attack is refused and nothing changes
(consumer lists, stream state); the device's own watch and download still work and make
no consumer, and another device's watch keeps working.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    RELEASES_BUCKET,
    REPORTS_DURABLE,
    REPORTS_STREAM,
    ROOTS_BUCKET,
)
from edge_agent.transport import objects
from edge_agent.transport.connect import NatsAuth
from edge_agent.transport.direct import KeyHints
from ledger.signing import SigningKey
from tests.fleet import Fleet
from tests.test_nats_permissions import Conn

pytestmark = pytest.mark.timeout(60)

ASG = f"KV_{ASSIGNMENTS_BUCKET}"
ROOTS = f"KV_{ROOTS_BUCKET}"
OBJ = f"OBJ_{RELEASES_BUCKET}"
STREAMS = (REPORTS_STREAM, ASG, ROOTS, OBJ)
BLOB = b"m" * 200_000
BLOB_NAME = "b" * 64


class Setting:
    def __init__(self, fleet: Fleet, a: Conn, b: Conn, b_watch: KeyHints) -> None:
        self.fleet, self.a, self.b, self.b_watch = fleet, a, b, b_watch

    async def snapshot(self) -> dict[str, Any]:
        js = self.fleet.hub.edge.js
        state: dict[str, Any] = {}
        for stream in STREAMS:
            info = await js.stream_info(stream)
            names = sorted(c.name for c in await js.consumers_info(stream))
            state[stream] = (names, info.state.messages, info.state.last_seq)
        return state


@pytest.fixture
async def setting(fleet: Fleet) -> AsyncIterator[Setting]:
    """dev-a and dev-b enrolled and connected with their bundles; dev-b watches its
    assignment; the hub's report consumer runs; a blob in the releases bucket."""
    async with await fleet.client() as admin:
        for name in ("dev-a", "dev-b"):
            await admin.call("device.enroll", {"device": name})
    js = fleet.hub.edge.js
    for device in ("dev-a", "dev-b"):
        await (await js.key_value(ASSIGNMENTS_BUCKET)).put(device, f"for {device}".encode())
    await (await js.object_store(RELEASES_BUCKET)).put(BLOB_NAME, BLOB)  # what devices read
    conns = []
    for name in ("dev-a", "dev-b"):
        key = SigningKey.load(fleet.bundle(name) / "device.key")
        conns.append(await Conn.open(fleet.nats_url,
                                     NatsAuth.for_device(name, key.private_raw())))
    a, b = conns
    b_watch = await KeyHints.start(b.nc, ASSIGNMENTS_BUCKET, "dev-b")
    assert await b_watch.updates(5) == b"for dev-b"
    try:
        yield Setting(fleet, a, b, b_watch)
    finally:
        await b_watch.stop()
        for conn in conns:
            await conn.close()


@pytest.mark.parametrize("subject", [
    f"$JS.API.CONSUMER.DURABLE.CREATE.{REPORTS_STREAM}.evil",
    f"$JS.API.CONSUMER.CREATE.{REPORTS_STREAM}.evil",
    f"$JS.API.CONSUMER.CREATE.{REPORTS_STREAM}.evil.fleet.report.>",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{ASG}.evil",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{ROOTS}.evil",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{OBJ}.evil",
    f"$JS.API.CONSUMER.CREATE.{ASG}.evil",
    f"$JS.API.CONSUMER.CREATE.{ASG}.w.$KV.{ASSIGNMENTS_BUCKET}.dev-a",  # even its own key
    f"$JS.API.CONSUMER.CREATE.{ROOTS}",
    f"$JS.API.CONSUMER.CREATE.{ROOTS}.lingers.$KV.{ROOTS_BUCKET}.>",
    f"$JS.API.CONSUMER.CREATE.{OBJ}",
])
async def test_a_device_cannot_create_any_consumer(setting: Setting, subject: str) -> None:
    before = await setting.snapshot()
    body = json.dumps({"stream_name": subject.split(".")[-2], "config": {
        "durable_name": "evil", "name": "evil", "ack_policy": "explicit"}}).encode()
    await setting.a.refused(subject, setting.a.nc.request(subject, body, timeout=2))
    assert await setting.snapshot() == before


async def test_a_device_cannot_delete_the_hubs_report_consumer(setting: Setting) -> None:
    before = await setting.snapshot()
    assert REPORTS_DURABLE in before[REPORTS_STREAM][0]
    subject = f"$JS.API.CONSUMER.DELETE.{REPORTS_STREAM}.{REPORTS_DURABLE}"
    await setting.a.refused(subject, setting.a.nc.request(subject, b"", timeout=2))
    assert await setting.snapshot() == before


async def test_a_device_cannot_delete_consumers_and_another_devices_watch_goes_on(
        setting: Setting) -> None:
    before = await setting.snapshot()
    for stream in (ASG, ROOTS, OBJ):
        subject = f"$JS.API.CONSUMER.DELETE.{stream}.any"
        await setting.a.refused(subject, setting.a.nc.request(subject, b"", timeout=2))
    assert await setting.snapshot() == before
    kv = await setting.fleet.hub.edge.js.key_value(ASSIGNMENTS_BUCKET)
    await kv.put("dev-b", b"still watched")
    assert await setting.b_watch.updates(5) == b"still watched"


async def test_the_devices_own_watch_and_download_work_without_consumers(
        setting: Setting) -> None:
    before = await setting.snapshot()
    watch = await KeyHints.start(setting.a.nc, ASSIGNMENTS_BUCKET, "dev-a")
    try:
        assert await watch.updates(5) == b"for dev-a"
    finally:
        await watch.stop()
    ref = await objects.object_ref(setting.a.nc, RELEASES_BUCKET, BLOB_NAME, len(BLOB))
    data = b"".join([c.data async for c in objects.iter_chunks_from(
        setting.a.nc, RELEASES_BUCKET, ref, len(BLOB))])
    assert data == BLOB
    assert not any("permissions violation" in e.lower() for e in setting.a.errors), \
        setting.a.errors
    assert await setting.snapshot() == before  # no consumer made, nothing written

"""Class 6 of issue 12: consumers a device may create or delete.

A stolen device bundle (its NATS user, on a real nats-server with the `hub init`
configuration) may not create a durable consumer where it would outlive the device's
use of it, nor delete a consumer it does not own: the hub's durable report consumer,
another device's watch. Each attack is refused and nothing changes (consumer lists,
stream state); the device's own watch and download still work.
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
from edge_agent.transport.kv_watch import KeyWatch
from hub.service.nats import FLEET_CONSUMER_INACTIVE_S
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
    def __init__(self, fleet: Fleet, a: Conn, b: Conn, b_watch: KeyWatch) -> None:
        self.fleet, self.a, self.b, self.b_watch = fleet, a, b, b_watch

    async def snapshot(self) -> dict[str, Any]:
        js = self.fleet.hub.edge.js
        state: dict[str, Any] = {}
        for stream in STREAMS:
            info = await js.stream_info(stream)
            names = sorted(c.name for c in await js.consumers_info(stream))
            state[stream] = (names, info.state.messages, info.state.last_seq)
        return state


def b_watch_name(setting: Setting) -> str:
    sub: Any = setting.b_watch._sub
    return str(sub._sub._jsi._ccreq.name)  # nats-py 2.16: the ordered consumer's name


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
    b_watch = await KeyWatch.start(b.nc.jetstream(), ASSIGNMENTS_BUCKET, "dev-b")
    assert (await b_watch.updates(5)).value == b"for dev-b"
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
])
async def test_a_device_cannot_create_a_durable_consumer(setting: Setting, subject: str) -> None:
    before = await setting.snapshot()
    body = json.dumps({"stream_name": subject.split(".")[-2], "config": {
        "durable_name": "evil", "name": "evil", "ack_policy": "explicit"}}).encode()
    await setting.a.refused(subject, setting.a.nc.request(subject, body, timeout=2))
    assert await setting.snapshot() == before


async def test_a_named_consumer_on_a_readable_bucket_expires(setting: Setting) -> None:
    """The one named create a device needs (`CONSUMER.CREATE.<stream>.<name>...`) cannot
    say "durable" in the subject; a durable asked for in the body gets the stream's
    inactive threshold (it expires once unused), and a longer one is refused."""
    for body_threshold, accepted in ((None, True), (10 * FLEET_CONSUMER_INACTIVE_S, False)):
        config: dict[str, Any] = {"durable_name": "lingers", "name": "lingers",
                                  "filter_subject": f"$KV.{ROOTS_BUCKET}.>"}
        if body_threshold is not None:
            config["inactive_threshold"] = int(body_threshold * 1e9)
        reply = json.loads((await setting.a.nc.request(
            f"$JS.API.CONSUMER.CREATE.{ROOTS}.lingers.$KV.{ROOTS_BUCKET}.>",
            json.dumps({"stream_name": ROOTS, "config": config}).encode(), timeout=5)).data)
        if accepted:
            assert reply["config"]["inactive_threshold"] == int(FLEET_CONSUMER_INACTIVE_S * 1e9)
        else:
            assert reply["error"]["err_code"] == 10153, reply


async def test_a_device_cannot_delete_the_hubs_report_consumer(setting: Setting) -> None:
    before = await setting.snapshot()
    assert REPORTS_DURABLE in before[REPORTS_STREAM][0]
    subject = f"$JS.API.CONSUMER.DELETE.{REPORTS_STREAM}.{REPORTS_DURABLE}"
    await setting.a.refused(subject, setting.a.nc.request(subject, b"", timeout=2))
    assert await setting.snapshot() == before


async def test_a_device_cannot_delete_another_devices_watch(setting: Setting) -> None:
    before = await setting.snapshot()
    name = b_watch_name(setting)
    assert name in before[ASG][0]
    for stream in (ASG, ROOTS, OBJ):
        subject = f"$JS.API.CONSUMER.DELETE.{stream}.{name}"
        await setting.a.refused(subject, setting.a.nc.request(subject, b"", timeout=2))
    assert await setting.snapshot() == before
    kv = await setting.fleet.hub.edge.js.key_value(ASSIGNMENTS_BUCKET)
    await kv.put("dev-b", b"still watched")
    assert (await setting.b_watch.updates(5)).value == b"still watched"


async def test_the_devices_own_watch_and_download_work(setting: Setting) -> None:
    js = setting.a.nc.jetstream()
    watch = await KeyWatch.start(js, ASSIGNMENTS_BUCKET, "dev-a")
    try:
        assert (await watch.updates(5)).value == b"for dev-a"
    finally:
        await watch.stop()
    ref = await objects.object_ref(js, RELEASES_BUCKET, BLOB_NAME, len(BLOB))
    data = b"".join([c.data async for c in objects.iter_chunks_from(
        js, RELEASES_BUCKET, ref, len(BLOB), delete_consumer=False)])
    assert data == BLOB
    assert not any("permissions violation" in e.lower() for e in setting.a.errors), \
        setting.a.errors
    consumers = await setting.fleet.hub.edge.js.consumers_info(OBJ)
    assert all(c.config.inactive_threshold is not None
               and c.config.inactive_threshold <= FLEET_CONSUMER_INACTIVE_S for c in consumers)

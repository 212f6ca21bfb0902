"""Poison reports (issue 12, class 6): a device's report that breaks a bound is refused
at decode, counted by reason, logged once and acknowledged; it never stops intake for
the rest of the fleet, never breaks the rollout controller or `hub telemetry`, and
changes the ledger only by what it should.

Each test publishes what a hostile (or broken) device could send, on a real hub with a
real nats-server, then checks: the reason counter grew, the REPORTS consumer has nothing
pending or unacknowledged, a following valid report from another device is counted, the
telemetry reads still answer, and the ledger head moved only as it should.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from edge_agent import protocol as proto
from edge_agent.protocol.bins import LATENCY_BUCKETS_MS
from edge_agent.protocol.names import REPORTS_DURABLE, REPORTS_STREAM
from hub import events as ev
from hub.client import HubClient
from ledger.encoding import canonical_encode
from ledger.signing import SigningKey
from tests.fleet import Fleet, ledger_state

pytestmark = pytest.mark.timeout(90)

DIGEST = "ab" * 32


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[HubClient]:
    # As the hub's NATS user: these tests publish reports in devices' names.
    async with await fleet.client(role="hub") as c:
        for device in ("dev-a", "dev-b"):
            await c.call("device.enroll", {"device": device})
        yield c


def window_map(device: str, seq: int, count: int = 10, **extra: Any) -> dict[str, Any]:
    now = time.time_ns()
    doc: dict[str, Any] = {
        "type": "telemetry", "device": device, "boot": "boot-1", "seq": seq, "model": "kws",
        "version": "1", "digest": DIGEST, "start": now - 1_000_000_000, "end": now,
        "count": count, "errors": 0, "latency_ms_p50": 0.1, "latency_ms_p95": 0.2,
        "latency_ms_max": 0.3, "counter": 1,
        "latency_buckets": [count] + [0] * len(LATENCY_BUCKETS_MS),
        "output_hist": [],
    }
    doc.update(extra)
    return doc


def status(device: str, seq: int, reason: str = "") -> proto.StatusReport:
    return proto.StatusReport(
        device=device, boot="boot-1", seq=seq, ts=time.time_ns(), event=proto.STATUS_FAILED,
        model="kws", version="1", digest=DIGEST, counter=1, reason=reason)


async def publish(client: HubClient, device: str, kind: str, data: bytes) -> None:
    await client.nc.jetstream().publish(f"fleet.report.{device}.{kind}", data)


async def refused_by(client: HubClient) -> dict[str, int]:
    return dict((await client.call("status"))["refused_by_reason"])


async def counted(client: HubClient, device: str) -> int:
    rows = (await client.call("telemetry", {"device": device}))["devices"]
    return sum(int(r["windows"]) for r in rows)


async def until(what: str, check: Any, timeout: float = 20.0) -> None:
    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(loop(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def refused_and_intake_goes_on(fleet: Fleet, client: HubClient, before: dict[str, int],
                                     reason: str, at_least: int = 1) -> None:
    """`reason` counted `at_least` more times, everything acknowledged, and a valid
    window from dev-b (another device) counted afterwards; the reads still answer."""
    async def refused_enough() -> bool:
        now = await refused_by(client)
        return now.get(reason, 0) - before.get(reason, 0) >= at_least

    await until(f"{at_least} report(s) refused as {reason!r}", refused_enough)
    windows_b = await counted(client, "dev-b")
    seq = 1000 + windows_b
    await publish(client, "dev-b", "telemetry", canonical_encode(window_map("dev-b", seq)))

    async def b_counted() -> bool:
        return await counted(client, "dev-b") == windows_b + 1

    await until("dev-b's valid window to be counted", b_counted)
    info = await client.nc.jetstream().consumer_info(REPORTS_STREAM, REPORTS_DURABLE)
    assert info.num_ack_pending == 0 and info.num_pending == 0, info
    # The reads that broke before: the fleet view, a device view, a rollout's view.
    await client.call("telemetry", {})
    await client.call("telemetry", {"device": "dev-a"})
    fleet.hub.telemetry.view([("dev-a", DIGEST, 1), ("dev-b", DIGEST, 1)], [])
    tasks = {t["name"]: t for t in (await client.call("status"))["tasks"]}
    assert tasks["reports"]["state"] == "running", tasks
    assert tasks["rollouts"]["state"] == "running", tasks


async def test_two_windows_summing_past_2_63_are_refused(fleet: Fleet,
                                                         client: HubClient) -> None:
    before, head = await refused_by(client), ledger_state(fleet)
    big = 2**62 + 1  # each is a valid int64; their sum is not
    for seq in (1, 2):
        doc = window_map("dev-a", seq, count=big, latency_buckets=[big] + [0] * 14)
        await publish(client, "dev-a", "telemetry", canonical_encode(doc))
    await refused_and_intake_goes_on(fleet, client, before, "bounds", at_least=2)
    assert await counted(client, "dev-a") == 0
    assert ledger_state(fleet) == head


async def test_a_17_bucket_latency_histogram_is_refused(fleet: Fleet,
                                                        client: HubClient) -> None:
    before, head = await refused_by(client), ledger_state(fleet)
    doc = window_map("dev-a", 1, count=5, latency_buckets=[0] * 16 + [5])
    await publish(client, "dev-a", "telemetry", canonical_encode(doc))
    await refused_and_intake_goes_on(fleet, client, before, "bounds")
    assert await counted(client, "dev-a") == 0
    assert ledger_state(fleet) == head


async def test_garbage_bytes_are_refused(fleet: Fleet, client: HubClient) -> None:
    before, head = await refused_by(client), ledger_state(fleet)
    for junk in (b"\xff\x00garbage", b"", canonical_encode([1, 2, 3]),
                 canonical_encode({"type": "telemetry"})):
        await publish(client, "dev-a", "telemetry", junk)
    await refused_and_intake_goes_on(fleet, client, before, "malformed", at_least=4)
    assert ledger_state(fleet) == head


async def test_a_replayed_status_report_is_refused(fleet: Fleet, client: HubClient) -> None:
    key = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    signed = proto.encode_signed_report(status("dev-a", 1, "boom"), key)
    before, (count, _) = await refused_by(client), ledger_state(fleet)
    await publish(client, "dev-a", "status", signed)
    await fleet.feed.wait_for(lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED)),
                              what="the first report in the ledger")
    for _ in range(3):  # the same signed bytes again: a replay
        await publish(client, "dev-a", "status", signed)
    await refused_and_intake_goes_on(fleet, client, before, "duplicate", at_least=3)
    assert fleet.hub.store.count() == count + 1  # the report once, the replays never
    assert fleet.hub.store.verify().ok


async def test_an_oversized_status_report_is_refused(fleet: Fleet, client: HubClient) -> None:
    key = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    before, head = await refused_by(client), ledger_state(fleet)
    # Issue 12: 200 KB reports became permanent ledger entries. Now over every bound.
    await publish(client, "dev-a", "status",
                  proto.encode_signed_report(status("dev-a", 1, "x" * 200_000), key))
    await refused_and_intake_goes_on(fleet, client, before, "oversized")
    # A reason past its bound, in a report of allowed size: refused as well.
    await publish(client, "dev-a", "status",
                  proto.encode_signed_report(status("dev-a", 2, "x" * 2000), key))
    await refused_and_intake_goes_on(fleet, client, before, "bounds")
    assert ledger_state(fleet) == head


async def test_a_flood_of_status_reports_from_one_device_is_bounded(
    fleet: Fleet, client: HubClient
) -> None:
    from hub.devices.reports import STATUS_BURST

    key = SigningKey.load(fleet.bundle("dev-a") / "device.key")
    before, (count, _) = await refused_by(client), ledger_state(fleet)
    flood = 100
    for seq in range(1, flood + 1):  # each valid, signed, new: only the rate is wrong
        await publish(client, "dev-a", "status",
                      proto.encode_signed_report(status("dev-a", seq, "r" * 900), key))
    # Refill is 1 a second: a few more may be let through while the test runs.
    await refused_and_intake_goes_on(fleet, client, before, "rate",
                                     at_least=flood - STATUS_BURST - 10)
    added = fleet.hub.store.count() - count
    assert STATUS_BURST <= added <= STATUS_BURST + 10, added
    assert added + (await refused_by(client))["rate"] - before.get("rate", 0) == flood
    assert fleet.hub.store.verify().ok


async def test_output_histograms_of_another_shape_are_refused(fleet: Fleet,
                                                             client: HubClient) -> None:
    before, head = await refused_by(client), ledger_state(fleet)
    await publish(client, "dev-a", "telemetry",
                  canonical_encode(window_map("dev-a", 1, output_hist=[[4, 6]])))

    async def a_counted() -> bool:
        return await counted(client, "dev-a") == 1

    await until("dev-a's first window", a_counted)
    # The same assignment, with a third bin: the aggregate cannot take it.
    await publish(client, "dev-a", "telemetry",
                  canonical_encode(window_map("dev-a", 2, output_hist=[[4, 3, 3]])))
    await refused_and_intake_goes_on(fleet, client, before, "bounds")
    assert await counted(client, "dev-a") == 1
    assert ledger_state(fleet) == head

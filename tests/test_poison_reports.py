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
from hub.client import HubClient
from ledger.encoding import canonical_encode
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

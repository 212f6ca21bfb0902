"""`telemetry` for a fleet larger than one NATS reply holds (256 KiB by default): the
fleet view is paged, ordered as asked, and bad paging input is one clear error."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from edge_agent import protocol as proto
from hub.errors import HubError
from hub.wire import MAX_TELEMETRY_PAGE, TELEMETRY_PAGE
from tests.fleet import Fleet
from tests.test_cli import clear_error, run

pytestmark = pytest.mark.timeout(120)

DEVICES = 2000  # every device's rows in one reply would be ~600 KB


def window(device: str, errors: int) -> proto.TelemetryWindow:
    now = time.time_ns()
    return proto.TelemetryWindow(
        device=device, boot="b", seq=1, model="kws", version="2", digest="d" * 64,
        start=now, end=now, count=100, errors=errors, latency_ms_p50=0.1,
        latency_ms_p95=0.2, latency_ms_max=0.3, counter=1, latency_buckets=[0, 90, 10],
        output_hist=[[10, 20, 30, 20, 10, 5, 3, 1, 1, 0]] * 2)


async def test_fleet_telemetry_pages_through_more_devices_than_one_reply_holds(
    fleet: Fleet,
) -> None:
    ids = [f"t-{i:04d}" for i in range(DEVICES)]
    for i, device in enumerate(ids):
        fleet.hub.telemetry.offer(window(device, errors=i % 7))
    fleet.hub.telemetry.flush()
    async with await fleet.client() as admin:
        first = await admin.call("telemetry")
        assert first["device_count"] == DEVICES
        assert len(first["devices"]) == TELEMETRY_PAGE
        assert first["windows"] == DEVICES
        # Worst error rate first (6 errors per 100), ties by device id.
        assert [r["errors"] for r in first["devices"]] == [6] * TELEMETRY_PAGE
        assert [r["device"] for r in first["devices"]] == sorted(
            d for i, d in enumerate(ids) if i % 7 == 6)[:TELEMETRY_PAGE]

        seen: list[str] = []
        while True:
            page = await admin.call("telemetry", {"sort": "device", "offset": len(seen),
                                                  "limit": MAX_TELEMETRY_PAGE})
            if not page["devices"]:
                break
            seen += [r["device"] for r in page["devices"]]
        assert seen == ids  # every device exactly once, in order

        with pytest.raises(HubError, match="invalid limit"):
            await admin.call("telemetry", {"limit": MAX_TELEMETRY_PAGE + 1})
        with pytest.raises(HubError, match="invalid offset"):
            await admin.call("telemetry", {"offset": -1})
        with pytest.raises(HubError, match="unknown sort"):
            await admin.call("telemetry", {"sort": "mood"})
        # One device's detail is unchanged (all its windows, output histograms).
        one = await admin.call("telemetry", {"device": ids[3]})
        assert [r["output_hist"] for r in one["devices"]] == [[[10, 20, 30, 20, 10, 5, 3, 1,
                                                                1, 0]] * 2]
        assert (await admin.call("status"))["entries"] > 0  # the hub still serves


async def test_hub_telemetry_cli_shows_one_page_or_every_page(fleet: Fleet) -> None:
    ids = [f"c-{i:04d}" for i in range(MAX_TELEMETRY_PAGE + 100)]  # more than one page
    for i, device in enumerate(ids):
        fleet.hub.telemetry.offer(window(device, errors=i % 3))
    fleet.hub.telemetry.flush()
    home = str(fleet.config.home)
    page, every, bad = await asyncio.gather(
        asyncio.to_thread(run, "hub.cli", "telemetry", "--limit", "5", "--home", home),
        asyncio.to_thread(run, "hub.cli", "telemetry", "--all", "--sort", "device", "--json",
                          "--home", home),
        asyncio.to_thread(run, "hub.cli", "telemetry", "--sort", "mood", "--home", home))
    assert page.returncode == 0, page.stderr
    assert f"devices 1-5 of {len(ids):,}, by error-rate" in page.stdout
    assert every.returncode == 0, every.stderr
    assert [r["device"] for r in json.loads(every.stdout)["devices"]] == ids
    clear_error(bad, 2, "unknown --sort 'mood'")

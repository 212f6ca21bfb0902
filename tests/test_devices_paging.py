"""`devices` for a fleet larger than one NATS reply holds: pages, cut short by size when
rows are large, with state counts; `hub devices` shows a page or every page."""

from __future__ import annotations

import asyncio
import json

import pytest

from hub import events as ev
from hub.devices import reads
from hub.errors import HubError
from ledger.signing import SigningKey
from ledger.storage.store import NewEvent
from tests.fleet import Fleet
from tests.test_cli import run

pytestmark = pytest.mark.timeout(180)

DEVICES = 1500  # ~600 KB of rows: more than twice what one reply may carry


async def enrolled(fleet: Fleet, count: int) -> list[str]:
    """`count` devices enrolled in the ledger (the events `device.enroll` records; no
    bundles or NATS users, which paging does not need)."""
    ids = [f"p-{i:04d}" for i in range(count)]
    public = SigningKey.generate().public.raw
    async with fleet.hub.writer.lock:
        await fleet.hub.writer.append([NewEvent(ev.DEVICE_ENROLLED, "test", ev.device_subject(d),
                                                {"device": d, "public": public}) for d in ids])
    return ids


async def test_devices_pages_through_a_fleet_larger_than_one_reply(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = await enrolled(fleet, DEVICES)
    async with await fleet.client() as admin:
        first = await admin.call("devices")
        assert first["device_count"] == DEVICES and first["states"] == {"enrolled": DEVICES}
        assert [r["device"] for r in first["devices"]] == ids[:reads.DEVICES_PAGE]
        assert first["next_offset"] == reads.DEVICES_PAGE
        assert await admin.devices() == await admin.devices("enrolled")
        assert [r["device"] for r in await admin.devices()] == ids
        assert await admin.devices("failed") == []
        # Rows that do not fit the reply budget move to the next page; none is lost.
        monkeypatch.setattr(reads, "DEVICES_REPLY_BYTES", 4096)
        small = await admin.call("devices", {"limit": 50})
        assert 1 <= len(small["devices"]) < 50 and small["next_offset"] == len(small["devices"])
        assert [r["device"] for r in await admin.devices()] == ids
        for body, words in (({"limit": 0}, "invalid limit"), ({"offset": -1}, "invalid offset"),
                            ({"state": 3}, "'state' must be text")):
            with pytest.raises(HubError, match=words):
                await admin.call("devices", body)


async def test_hub_devices_cli_shows_one_page_or_every_page(fleet: Fleet) -> None:
    ids = await enrolled(fleet, 700)
    home = str(fleet.config.home)
    page, every, bad = await asyncio.gather(
        asyncio.to_thread(run, "hub.cli", "devices", "--limit", "5", "--home", home),
        asyncio.to_thread(run, "hub.cli", "devices", "--all", "--json", "--home", home),
        asyncio.to_thread(run, "hub.cli", "devices", "--limit", "0", "--home", home))
    assert page.returncode == 0, page.stderr
    assert "devices 1-5 of 700 (700 enrolled)" in page.stdout and "--offset 5" in page.stdout
    assert every.returncode == 0, every.stderr
    assert [r["device"] for r in json.loads(every.stdout)["devices"]] == ids
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "Invalid value for '--limit'" in bad.stderr, bad.stderr

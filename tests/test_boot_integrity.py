"""Boot integrity: the agent checks the active slot before it maps the model.

A real agent runs kws/2 with kws/1 kept for revert; it is stopped, its slot files are
damaged on disk, and it is started again:

- bytes flipped in the model's header (the TFLite runtime crashes on such a file: it
  used to kill the agent at every start), or in its body (the file still loads and used
  to run under the release's digest), or the file deleted (the agent used to run
  nothing while the hub showed `applied`): the agent goes back to kws/1 and reports
  `reverted` with the reason;
- both slots damaged: the agent reports `failed` with the reason, downloads its current
  assignment again and runs it.

In every case the agent keeps running and never serves the damaged bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from edge_agent import protocol as proto
from edge_agent.slots import SlotStore
from hub import events as ev
from hub.client import HubClient
from testkit.modelgen import model_for_version
from tests.device_kit import ConfiguredAgent, ReportWatch, configured_agent, deploy_and_wait
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(150)

DEVICE = "dev-0"


@dataclass
class Device:
    fleet: Fleet
    client: HubClient
    agent: ConfiguredAgent
    reports: ReportWatch
    digests: dict[str, str]

    def slot_of(self, version: str) -> Path:
        slots = SlotStore(self.agent.state_dir)
        for entry in (slots.active(), slots.previous()):
            if entry is not None and entry.metadata["version"] == version:
                return entry.path
        raise AssertionError(f"kws/{version} is in no slot")

    async def restart(self) -> tuple[int, proto.StatusReport]:
        """Start the stopped agent; returns the report mark and its `started` report."""
        mark = self.reports.mark()
        self.agent.start()
        started = await self.reports.status(proto.STATUS_STARTED, after=mark, timeout=60)
        return mark, started


@pytest.fixture
async def on_v2(fleet: Fleet, tmp_path: Path) -> AsyncIterator[Device]:
    """kws/2 active, kws/1 previous; the agent stopped."""
    digests = {}
    for version in ("1", "2"):
        path = tmp_path / f"kws-v{version}.tflite"
        path.write_bytes(model_for_version(int(version), extra_bytes=200_000))
        digests[version] = blake3.blake3(path.read_bytes()).hexdigest()
        await fleet.release_model(path, "kws", version)
    agent = configured_agent(fleet, DEVICE, ["--health-window", "1"])
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        reports = await ReportWatch.start(fleet.url_as(), DEVICE)
        agent.start()
        try:
            await deploy_and_wait(fleet, client, "1", [DEVICE])
            await deploy_and_wait(fleet, client, "2", [DEVICE])
            agent.stop()
            yield Device(fleet, client, agent, reports, digests)
        finally:
            await reports.close()


def flip(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    start = 8 if where == "header" else len(data) // 2
    for i in range(start, start + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["header", "body", "deleted"])
async def test_a_damaged_active_slot_falls_back_to_the_previous_model(
    on_v2: Device, damage: str
) -> None:
    v2 = on_v2.slot_of("2")
    if damage == "deleted":
        v2.unlink()
    else:
        flip(v2, damage)
    mark, started = await on_v2.restart()

    reverted = await on_v2.reports.status(proto.STATUS_REVERTED, after=mark)
    assert "boot check" in reverted.reason, reverted.reason
    assert ("missing" if damage == "deleted" else "corrupted") in reverted.reason
    assert (reverted.version, reverted.digest) == ("1", on_v2.digests["1"])
    # It runs kws/1, and only kws/1: no window ever counts the damaged kws/2.
    assert (started.version, started.digest) == ("1", on_v2.digests["1"])
    window = await on_v2.reports.telemetry_of(on_v2.digests["1"], after=mark)
    assert window.errors == 0
    assert not [r for r in on_v2.reports.reports[mark:]
                if isinstance(r, proto.TelemetryWindow) and r.boot == started.boot
                and r.digest == on_v2.digests["2"]]
    await on_v2.fleet.feed.wait_for(
        lambda _: any("boot check" in e.payload["reason"] for e in
                      on_v2.fleet.feed.of_kind(ev.DEVICE_UPDATE_REVERTED, DEVICE)),
        what="the revert in the device's history")
    active = SlotStore(on_v2.agent.state_dir).active()
    assert active is not None and active.metadata["version"] == "1"
    assert on_v2.agent.running(), on_v2.agent.log()[-3000:]


async def test_no_usable_slot_is_reported_and_the_assignment_installed_again(
    on_v2: Device,
) -> None:
    flip(on_v2.slot_of("2"), "header")
    flip(on_v2.slot_of("1"), "body")
    applied_before = len(on_v2.fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE))
    mark, _ = await on_v2.restart()

    failed = await on_v2.reports.status(proto.STATUS_FAILED, after=mark)
    assert "boot check" in failed.reason and "no usable model" in failed.reason, failed.reason
    assert "previous model is unusable" in failed.reason, failed.reason
    # It asks for its assignment again: kws/2 is downloaded, checked and applied.
    applied = await on_v2.reports.status(proto.STATUS_APPLIED, after=mark, timeout=60)
    assert (applied.version, applied.digest) == ("2", on_v2.digests["2"])
    await on_v2.fleet.feed.wait_for(
        lambda _: len(on_v2.fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE))
        > applied_before, what="kws/2 applied again")
    active = SlotStore(on_v2.agent.state_dir).active()
    assert active is not None and active.metadata["digest"] == on_v2.digests["2"]
    assert blake3.blake3(active.path.read_bytes()).hexdigest() == on_v2.digests["2"]
    await on_v2.reports.telemetry_of(on_v2.digests["2"], after=mark)
    assert on_v2.agent.running(), on_v2.agent.log()[-3000:]

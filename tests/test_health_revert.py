"""The health window after a switch: the agent goes back to the previous model by itself.

Faults are injected with the agent's test hook, FLEET_AGENT_FAULTS (edge_agent.agent):
`error_rate:1.0,version:2` makes every inference of kws/2 fail, `load_error:1,version:2`
makes kws/2 fail to load at start. The crash loop is real: the agent is killed three
times in a row after the switch.
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
from tests.device_kit import ConfiguredAgent, ReportWatch, configured_agent, deploy_and_wait
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(120)

DEVICE = "dev-0"


@dataclass
class Device:
    fleet: Fleet
    client: HubClient
    agent: ConfiguredAgent
    reports: ReportWatch
    digests: dict[str, str]

    async def on_v2(self) -> int:
        """Deploy kws/1 then kws/2; returns kws/2's assignment counter."""
        await deploy_and_wait(self.fleet, self.client, "1", [DEVICE])
        await deploy_and_wait(self.fleet, self.client, "2", [DEVICE])
        return int(self.fleet.feed.of_kind(ev.DEVICE_ASSIGNED, DEVICE)[-1].payload["counter"])

    async def expect_revert(self, counter: int, mark: int, *words: str) -> proto.StatusReport:
        """Reverted to kws/1: reported with evidence, in the ledger, on disk, serving."""
        report = await self.reports.status(proto.STATUS_REVERTED, after=mark)
        for word in words:
            assert word in report.reason, report.reason
        # The report names what runs now and which assignment was reverted.
        assert (report.version, report.digest) == ("1", self.digests["1"])
        assert report.counter == counter
        await self.fleet.feed.wait_for(
            lambda _: bool(self.fleet.feed.of_kind(ev.DEVICE_UPDATE_REVERTED, DEVICE)),
            what="device.update_reverted in the ledger",
        )
        entry = self.fleet.feed.of_kind(ev.DEVICE_UPDATE_REVERTED, DEVICE)[-1]
        assert entry.payload["reason"] == report.reason
        active = SlotStore(self.agent.state_dir).active()
        assert active is not None and active.metadata["version"] == "1"
        assert blake3.blake3(active.path.read_bytes()).hexdigest() == self.digests["1"]
        window = await self.reports.telemetry_of(self.digests["1"], after=self.reports.mark())
        assert window.errors == 0
        assert self.agent.running(), self.agent.log()
        return report


async def device_with(
    fleet: Fleet, model_files: dict[str, Path], args: list[str], env: dict[str, str]
) -> AsyncIterator[Device]:
    for version in ("1", "2"):
        await fleet.release_model(model_files[version], "kws", version)
    digests = {v: blake3.blake3(model_files[v].read_bytes()).hexdigest() for v in ("1", "2")}
    agent = configured_agent(fleet, DEVICE, args, env)
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        reports = await ReportWatch.start(fleet.url_as(), DEVICE)
        agent.start()
        try:
            yield Device(fleet, client, agent, reports, digests)
        finally:
            await reports.close()


@pytest.fixture
async def failing_v2(fleet: Fleet, model_files: dict[str, Path]) -> AsyncIterator[Device]:
    env = {"FLEET_AGENT_FAULTS": "error_rate:1.0,version:2"}
    async for device in device_with(fleet, model_files, ["--health-window", "30"], env):
        yield device


@pytest.fixture
async def healthy(fleet: Fleet, model_files: dict[str, Path]) -> AsyncIterator[Device]:
    async for device in device_with(fleet, model_files, ["--health-window", "60"], {}):
        yield device


async def test_inference_errors_in_the_health_window_revert_to_the_previous_model(
    failing_v2: Device,
) -> None:
    mark = failing_v2.reports.mark()
    counter = await failing_v2.on_v2()
    await failing_v2.expect_revert(counter, mark, "error rate", "above 0.50",
                                   "reverted kws/2", "to kws/1")
    # The failing model's telemetry showed the errors before the revert.
    assert any(isinstance(r, proto.TelemetryWindow) and r.version == "2" and r.errors
               for r in failing_v2.reports.reports[mark:])
    # It is not installed again: the assignment was handled.
    assert len([e for e in failing_v2.fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)
                if e.payload["version"] == "2"]) == 1
    assert SlotStore(failing_v2.agent.state_dir).previous() is None


async def test_crash_loop_after_a_switch_reverts_to_the_previous_model(healthy: Device) -> None:
    counter = await healthy.on_v2()
    agent = healthy.agent
    boots = {r.boot for r in healthy.reports.reports}
    for restart in range(1, 4):
        agent.kill()
        mark = healthy.reports.mark()
        agent.start()
        # The spool may resend reports of the killed boot first (at least once): skip them.
        started = await healthy.reports.wait_for(
            lambda r: isinstance(r, proto.StatusReport) and r.event == proto.STATUS_STARTED
            and r.boot not in boots, after=mark, what="a started report of a new boot")
        assert isinstance(started, proto.StatusReport)
        boots.add(started.boot)
        if restart < 3:
            assert started.version == "2", f"restart {restart}"
    assert started.version == "1"
    report = await healthy.expect_revert(counter, mark, "crash loop: 3 restarts in")
    assert report.boot == started.boot


async def test_a_new_model_that_fails_to_load_at_start_is_reverted(healthy: Device) -> None:
    counter = await healthy.on_v2()
    agent = healthy.agent
    agent.stop()
    agent.env = {"FLEET_AGENT_FAULTS": "load_error:1,version:2"}
    mark = healthy.reports.mark()
    agent.start()
    await healthy.expect_revert(counter, mark, "load error", "injected")

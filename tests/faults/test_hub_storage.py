"""The hub's storage fails during intake (issue 13 item 4, "disk full"), on a real hub
with real agents: every append in the meantime is refused with a clear error and
leaves nothing half-written, report batches are not acknowledged (JetStream delivers
them again), the supervisor shows the intake task failing while it lasts, and intake
resumes by itself once the storage works again. In the end every window the agents
sent is counted exactly once, the status report sent during the failure is in the
ledger exactly once, and the chain verifies."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from edge_agent import protocol as proto
from edge_agent.protocol import boot_id
from edge_agent.protocol.names import REPORTS_DURABLE, REPORTS_STREAM
from hub import events as ev
from hub.errors import HubError
from hub.telemetry.ingest import FlushResult, TelemetryIngest
from ledger.signing import SigningKey
from ledger.storage.store import LedgerStore
from testkit.fleet_sim import SimFleet
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(180)


def disk_full() -> OperationalError:
    return OperationalError("INSERT ...", {}, sqlite3.OperationalError(
        "database or disk is full"))


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_intake_survives_a_full_disk_and_counts_everything_once(
    tmp_path: Path, fleet: Fleet, model_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 2,
                   rate=40.0, window=0.2)
    hub = fleet.hub
    try:
        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            await sim.enroll(admin)
            await sim.start()
            await admin.call("deploy", {"model": "kws", "version": "1", "all": True})
        await fleet.feed.wait_for(
            lambda _: len({e.subject for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED)})
            == len(sim.ids), timeout=60, what="every device to apply kws/1")
        await until(lambda: hub.telemetry.inferences_total > 0, 30, "telemetry to arrive")

        # The disk fills: every ledger append and every telemetry commit fails.
        failing = {"on": True}
        append_many = LedgerStore.append_many
        write = TelemetryIngest._write

        def failing_append(self: LedgerStore, *args: Any, **kwargs: Any) -> Any:
            if failing["on"]:
                raise disk_full()
            return append_many(self, *args, **kwargs)

        def failing_write(self: TelemetryIngest) -> FlushResult:
            if failing["on"]:
                raise disk_full()
            return write(self)

        monkeypatch.setattr(LedgerStore, "append_many", failing_append)
        monkeypatch.setattr(TelemetryIngest, "_write", failing_write)
        count_before, head_before = hub.store.count(), hub.store.head()
        counted_before = hub.telemetry.inferences_total

        # A device's status report arrives while the disk is full.
        device = sim.ids[0]
        report = proto.StatusReport(
            # A boot counter above the agent's own (reports are monotonic across boots).
            device=device, boot=boot_id(int(time.time()) + 3600, "d15c"), seq=1,
            ts=time.time_ns(),
            event=proto.STATUS_FAILED, model="kws", version="1", digest="ab" * 32,
            counter=1, reason="while the hub's disk was full")
        async with await fleet.client(role="hub") as raw:
            await raw.nc.jetstream().publish(
                f"fleet.report.{device}.status",
                proto.encode_signed_report(report, SigningKey.load(sim.key_path(device))))

            # The supervisor shows the failure, in `status` and in the metrics.
            async def intake_failing() -> dict[str, Any]:
                while True:
                    tasks = {t["name"]: t for t in (await raw.call("status"))["tasks"]}
                    if tasks["reports"]["state"] == "restarting":
                        return dict(tasks["reports"])
                    await asyncio.sleep(0.05)

            shown = await asyncio.wait_for(intake_failing(), 30)
            assert "database or disk is full" in shown["last_error"], shown
            assert 'fleet_hub_task_up{task="reports"} 0.0' in hub.render_metrics()
            # An operator command is refused with the storage's error, nothing half-written.
            with pytest.raises(HubError, match="disk is full"):
                await raw.call("device.tag", {"device": device, "tags": {"k": "v"}})
            await asyncio.sleep(2.0)  # the agents keep reporting; nothing is counted
            assert (hub.store.count(), hub.store.head()) == (count_before, head_before)
            assert hub.telemetry.inferences_total == counted_before

            failing["on"] = False  # space is back: intake resumes by itself
            await fleet.feed.wait_for(
                lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, device)),
                timeout=60, what="the report sent during the failure")
            await until(lambda: hub.telemetry.inferences_total > counted_before, 60,
                        "telemetry to be counted again")
            await sim.quiesce(timeout=60)
            await until(lambda: hub.telemetry.inferences_total == sim.produced(), 60,
                        f"hub count {hub.telemetry.inferences_total} == produced "
                        f"{sim.produced()}")
            tasks = {t["name"]: t for t in (await raw.call("status"))["tasks"]}
            assert tasks["reports"]["state"] == "running" and tasks["reports"]["restarts"] >= 1
            info = await raw.nc.jetstream().consumer_info(REPORTS_STREAM, REPORTS_DURABLE)
            assert info.num_pending == 0, info
        # Exactly once: the report sent during the failure, each window.
        failed = [e for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, device)
                  if e.payload["boot"] == report.boot]
        assert len(failed) == 1
        rows = hub.telemetry.device_rows()
        assert sum(r["duplicates"] for r in rows) >= 0
        assert sum(r["inferences"] for r in rows) == sim.produced()
        assert hub.store.verify().ok
        assert hub.store.count() == count_before + 1
    finally:
        await sim.stop()

"""Report intake shared by every hub process (docs/ARCHITECTURE.md "Several hub
processes, one leader"): two real `hub serve` processes on one PostgreSQL and one
nats-server pull telemetry from the shared durable consumer, the leader alone takes
status reports into the ledger.

- Both processes count windows (the split is printed), the database's total equals
  what the simulated devices sent, window for window, and both processes' `status`
  show that same total; every device's `applied` status report is one ledger entry.
- SIGKILL one process in the middle of intake: the batches it had fetched and not
  acknowledged come back after the consumer's ack wait and the other process counts
  them; the total is still exactly what was sent (nothing lost, nothing counted twice).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from edge_agent.protocol.names import REPORTS_DURABLE, REPORTS_STREAM, STATUS_DURABLE
from hub import events as ev
from hub.client import HubClient
from hub.devices.reports import REPORT_ACK_WAIT_S
from hub.telemetry.ingest import AGG, DEVS
from ledger.signing import SigningKey
from testkit.fleet_sim import SimFleet
from tests.test_hub_leader import Hubs, entries, release_model, until
from tests.test_hub_leader import hubs as hubs  # the fixture

pytestmark = [pytest.mark.timeout(300), pytest.mark.nats, pytest.mark.postgres]
N = 12


def db_windows(hubs: Hubs) -> tuple[int, int]:
    """(windows, inferences) counted, as the database has them (every process's)."""
    with hubs.engine.connect() as conn:
        windows = conn.execute(select(func.coalesce(func.sum(DEVS.c.windows), 0))).scalar_one()
        inferences = conn.execute(
            select(func.coalesce(func.sum(AGG.c.inferences), 0))).scalar_one()
    return int(windows), int(inferences)


def sent(sim: SimFleet) -> tuple[int, int]:
    """(windows, inferences) the simulated devices put into telemetry windows."""
    return sum(a.windows for a in sim.agents.values()), sim.produced()


async def status_by_pid(admin: HubClient, pids: set[int], timeout: float = 30
                        ) -> dict[int, dict[str, Any]]:
    """`status` from each of `pids` (the API is a queue group: ask until each answered)."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while set(seen) != pids:
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {sorted(pids)} answered"
        status = await admin.call("status")
        seen[int(status["leadership"]["this"]["pid"])] = status
    return seen


async def start_fleet(hubs: Hubs, model_files: dict[str, Path], tmp_path: Path,
                      admin: HubClient) -> SimFleet:
    await release_model(hubs, model_files["1"], "1")
    sim = SimFleet(hubs.nats_url, tmp_path / "sim", hubs.config.trust_root_path, N,
                   rate=50.0, window=0.05)
    await sim.enroll(admin)
    await sim.start()
    await admin.call("deploy", {"model": "kws", "version": "1", "all": True})
    return sim


async def hub_client(hubs: Hubs) -> HubClient:
    """On NATS as the hub's own user: consumer info is the hub account's."""
    key = SigningKey.load(hubs.config.operator_key_path("admin"))
    return await HubClient.connect(hubs.nats_url, key, timeout=5,
                                   auth=hubs.config.nats_auth("hub"))


def applied_entries(hubs: Hubs) -> Counter[str]:
    return Counter(e.subject for e in entries(hubs) if e.kind == ev.DEVICE_UPDATE_APPLIED)


async def test_two_hubs_share_intake_and_count_each_window_once(
    hubs: Hubs, model_files: dict[str, Path], tmp_path: Path
) -> None:
    pids = {p.pid for p in hubs.procs.values()}
    async with await hubs.client() as admin:
        sim = await start_fleet(hubs, model_files, tmp_path, admin)
        try:
            await until(lambda: len(applied_entries(hubs)) == N, 90,
                        "every device to apply kws/1")

            async def both_counted() -> bool:
                split = await status_by_pid(admin, pids)
                return all(s["intake"]["this_process"]["windows_counted"] > 0
                           for s in split.values())

            deadline = time.monotonic() + 60
            while not await both_counted():
                assert time.monotonic() < deadline, "both processes to count windows"
                await asyncio.sleep(0.5)
            await sim.quiesce(timeout=60)
            windows, inferences = sent(sim)
            await until(lambda: db_windows(hubs)[0] >= windows, 60,
                        f"the database to count {windows} windows")
            await asyncio.sleep(1.5)  # a late double count would show now
            assert db_windows(hubs) == (windows, inferences)
            await asyncio.sleep(1.1)  # the processes' reads refresh at most every second
            split = await status_by_pid(admin, pids)
        finally:
            await sim.stop()
    mine = {pid: s["intake"]["this_process"] for pid, s in split.items()}
    print(f"\n{windows} windows sent; counted by process: "
          + ", ".join(f"pid {pid} ({s['leadership']['this']['role']}) "
                      f"{mine[pid]['windows_counted']}" for pid, s in split.items()))
    assert all(m["windows_counted"] > 0 for m in mine.values())  # both took a share
    assert sum(m["windows_counted"] for m in mine.values()) == windows
    # Both processes' status show the database's total, the same numbers.
    assert {s["intake"]["windows_total"] for s in split.values()} == {windows}
    # Status reports are the leader's: exactly one ledger entry per device's report.
    assert set(applied_entries(hubs).values()) == {1}
    async with await hub_client(hubs) as raw:
        js = raw.nc.jetstream()
        for durable in (REPORTS_DURABLE, STATUS_DURABLE):
            info = await js.consumer_info(REPORTS_STREAM, durable)
            assert info.num_pending == 0 and info.num_ack_pending == 0, (durable, info)


async def test_a_hub_killed_mid_intake_loses_and_doubles_nothing(
    hubs: Hubs, model_files: dict[str, Path], tmp_path: Path
) -> None:
    async with await hubs.client() as admin:
        sim = await start_fleet(hubs, model_files, tmp_path, admin)
        try:
            await until(lambda: len(applied_entries(hubs)) == N, 90,
                        "every device to apply kws/1")
            standby = next(pid for pid, r in hubs.processes().items() if r.role == "standby")
            await until(lambda: db_windows(hubs)[0] > 200, 60, "intake to be under way")
            split = await status_by_pid(admin, {p.pid for p in hubs.procs.values()})
            before = split[standby]["intake"]["this_process"]["windows_counted"]
            assert before > 0, "the standby counts windows too"
            os.kill(standby, signal.SIGKILL)  # with batches fetched and not acknowledged
            killed_at = time.monotonic()
            await asyncio.sleep(1.0)  # devices go on sending meanwhile
            await sim.quiesce(timeout=60)
            windows, inferences = sent(sim)
            # What the killed process had fetched comes back after the ack wait.
            await until(lambda: db_windows(hubs)[0] >= windows,
                        REPORT_ACK_WAIT_S + 60, f"the database to count {windows} windows")
            took = time.monotonic() - killed_at
            await asyncio.sleep(1.5)
            assert db_windows(hubs) == (windows, inferences)
            async with await hub_client(hubs) as raw:
                info = await raw.nc.jetstream().consumer_info(REPORTS_STREAM, REPORTS_DURABLE)
            assert info.num_pending == 0 and info.num_ack_pending == 0, info
            print(f"\nkilled pid {standby} after it counted {before} windows; all {windows} "
                  f"windows counted {took:.1f} s later, {info.num_redelivered} redelivered")
        finally:
            await sim.stop()
    assert set(applied_entries(hubs).values()) == {1}

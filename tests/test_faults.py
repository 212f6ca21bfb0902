"""Fault tests.

- The hub killed with SIGKILL in the middle of a burst of appends: after a restart the
  chain verifies, no half-written entry exists, and every command the hub acknowledged
  is in the ledger.
- The NATS server killed with SIGKILL and restarted while devices report: the agents
  reconnect by themselves, their spools carry what the server never acknowledged, and
  the hub ends up counting exactly the inferences the agents produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.transport.connect import NO_AUTH, NatsAuth
from hub import events as ev
from hub.client import HubClient
from hub.errors import HubError
from hub.home.config import load_config
from ledger.signing import SigningKey
from ledger.storage.store import LedgerStore
from testkit.fleet_sim import SimFleet
from testkit.nats_server import EmbeddedNats
from tests.fleet import REPO_ROOT, Fleet


def start_hub(home: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "serve", "--home", str(home)],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
        )


async def wait_until_serving(url: str, key: SigningKey, proc: subprocess.Popen[bytes],
                             auth: NatsAuth = NO_AUTH) -> None:
    async def ready() -> None:
        while True:
            assert proc.poll() is None, "hub serve exited"
            with contextlib.suppress(HubError):
                async with await HubClient.connect(url, key, timeout=1, auth=auth) as client:
                    await client.call("status")
                    return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(ready(), 60)


@pytest.mark.timeout(180)
async def test_hub_killed_during_a_burst_loses_no_acknowledged_command(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    config = load_config(tmp_path / "hub")  # the nats_server fixture's home (auth on)
    key = SigningKey.load(config.operator_key_path("admin"))
    proc = start_hub(config.home, tmp_path / "hub.log")
    acknowledged: list[str] = []
    try:
        await wait_until_serving(nats_server.url, key, proc, config.operator_auth(key))
        async with await HubClient.connect(nats_server.url, key, timeout=5,
                                           auth=config.operator_auth(key)) as client:

            async def enroll(device: str) -> None:
                with contextlib.suppress(HubError):
                    await client.call("device.enroll", {"device": device})
                    acknowledged.append(device)

            burst = [asyncio.create_task(enroll(f"dev-{i:04d}")) for i in range(600)]
            # Kill once the hub is well into the burst, with requests still in flight.
            async def kill_when_busy() -> None:
                while len(acknowledged) < 50:
                    await asyncio.sleep(0.005)
                os.kill(proc.pid, signal.SIGKILL)

            await asyncio.wait_for(kill_when_busy(), 60)
            await asyncio.gather(*burst)
        proc.wait(timeout=10)
        assert 50 <= len(acknowledged) < 600, "the kill did not land inside the burst"

        # Restart: the hub opens the same ledger and serves again.
        proc = start_hub(config.home, tmp_path / "hub.log")
        await wait_until_serving(nats_server.url, key, proc, config.operator_auth(key))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)

    store = LedgerStore.open(config.database_url(), create=False)
    result = store.verify()
    assert result.ok, result.problem
    enrolled = {e.payload["device"] for e in store.iter_entries()
                if e.kind == ev.DEVICE_ENROLLED}
    missing = set(acknowledged) - enrolled
    assert not missing, f"acknowledged but not in the ledger: {sorted(missing)[:5]}"
    # Every entry decodes (no half-written row) and seqs are contiguous.
    seqs = [e.seq for e in store.iter_entries()]
    assert seqs == list(range(len(seqs)))
    store.close()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.mark.timeout(180)
async def test_nats_killed_and_restarted_while_devices_report_loses_nothing(
    tmp_path: Path, fleet: Fleet, nats_server: EmbeddedNats, model_files: dict[str, Path]
) -> None:
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 6,
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

        nats_server.kill()
        # While the server is down the agents keep inferring; windows pile up on disk.
        await until(lambda: sim.spooled() >= 3 * len(sim.ids), 30, "windows to be spooled")
        nats_server.start()  # same port, same JetStream store, same users

        produced = sim.produced()
        await until(lambda: hub.telemetry.inferences_total > produced, 60,
                    "reports made while NATS was down to be counted")
        await sim.quiesce(timeout=60)
        await until(lambda: hub.telemetry.inferences_total == sim.produced(), 60,
                    f"hub count {hub.telemetry.inferences_total} == produced {sim.produced()}")
        assert sum(a.spool.dropped for a in sim.agents.values()) == 0
    finally:
        await sim.stop()

"""KV follows the ledger continuously (issue 13 item 3), on a real hub, a real
nats-server and simulated agents:

- nats-server stopped right as a rollout's wave starts, for longer than the controller
  retries its KV writes: once the server is back, the hub's reconciler puts the
  assignments the controller left, and the rollout completes, with no operator action
  and no hub restart;
- a device's assignment, a release manifest and `root.latest` deleted from KV behind
  the hub's back are put back (the ledger's own bytes) within the reconcile interval;
- live assignments are renewed before they expire (same release, next counter, new
  expiry, in the ledger), and the device keeps running without a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError

from edge_agent import protocol as proto
from edge_agent.protocol.names import (
    ASSIGNMENTS_BUCKET,
    MANIFESTS_BUCKET,
    ROOT_LATEST_KEY,
    ROOTS_BUCKET,
)
from hub import events as ev
from hub.home.config import HubConfig
from testkit.fleet_sim import SimFleet
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(180)

RECONCILE_S = 1.0
GIVE_UP_S = 1.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def configure(config: HubConfig, **settings: Any) -> None:
    """Append settings to the hub home's config.toml (before the hub starts)."""
    path = config.home / "config.toml"
    lines = "".join(f"{key} = {value!r}\n" for key, value in settings.items())
    path.write_text(path.read_text() + lines)


@pytest.fixture
async def quick_fleet(tmp_path: Path, hub_home: HubConfig, nats_server: EmbeddedNats
                      ) -> AsyncIterator[Fleet]:
    """A fleet whose hub reconciles every second and leaves a KV write after 1 s."""
    configure(hub_home, reconcile_every_seconds=RECONCILE_S,
              kv_write_give_up_seconds=GIVE_UP_S)
    fleet = await Fleet(tmp_path, nats_server.url).start()
    try:
        yield fleet
    finally:
        await fleet.stop()


def ledger_kinds(fleet: Fleet, kind: str) -> list[Any]:
    return [e for e in fleet.hub.store.iter_entries() if e.kind == kind]


async def test_nats_down_as_a_wave_starts_the_rollout_still_completes(
    tmp_path: Path, quick_fleet: Fleet, nats_server: EmbeddedNats,
    model_files: dict[str, Path],
) -> None:
    fleet = quick_fleet
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 3,
                   prefix="wave", rate=2.0)
    hub = fleet.hub
    try:
        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            await sim.enroll(admin, group="lab")
        await sim.start()
        await sim.wait_watching(timeout=60)

        # The fault: the first assignment write of the wave finds nats-server gone.
        # Every write of the wave waits for the server to be stopped, then tries.
        real_put = hub.controller.put_assignment
        stopping: list[asyncio.Task[None]] = []

        async def put(device: str, envelope: bytes) -> None:
            if not stopping:
                stopping.append(asyncio.create_task(asyncio.to_thread(nats_server.stop)))
            await stopping[0]
            await real_put(device, envelope)

        hub.controller.put_assignment = put
        async with await fleet.client() as admin:
            rid = (await admin.call("rollout.create", {
                "model": "kws", "version": "1", "target": "group=lab", "waves": "100%",
                "min_success": 1.0, "max_failure": 0.0, "deadline": "90s"}))["rollout"]
            await admin.call("rollout.start", {"rollout": rid})

        async def all_left() -> bool:
            return hub.controller.writes_left >= len(sim.ids)

        # Longer than any internal timeout: the controller gave every write up.
        await until(all_left, 30, "the controller to leave its KV writes")
        assert ledger_kinds(fleet, ev.ROLLOUT_WAVE_STARTED)
        nats_server.start()  # same port, same store

        async def completed() -> bool:
            return bool(ledger_kinds(fleet, ev.ROLLOUT_COMPLETED))

        await until(completed, 60, "the rollout to complete after NATS came back")
        assert not ledger_kinds(fleet, ev.ROLLOUT_HALTED)
        assert not ledger_kinds(fleet, ev.ROLLOUT_DEVICES_TIMED_OUT)
        applied = {e.subject for e in ledger_kinds(fleet, ev.DEVICE_UPDATE_APPLIED)}
        assert applied == {ev.device_subject(d) for d in sim.ids}
        assert hub.store.verify().ok
        assert {t["name"]: t["state"] for t in hub.supervisor.states()}["reconcile"] == \
            "running"
    finally:
        await sim.stop()


async def test_keys_deleted_behind_the_hubs_back_are_put_back(
    tmp_path: Path, quick_fleet: Fleet, model_files: dict[str, Path],
) -> None:
    fleet = quick_fleet
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 1,
                   prefix="del", rate=2.0)
    device = sim.ids[0]
    nc = await fleet.connect()
    try:
        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            await sim.enroll(admin)
            await sim.start()
            await admin.call("deploy", {"model": "kws", "version": "1", "devices": [device]})
        await fleet.feed.wait_for(
            lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device)), timeout=60,
            what=f"{device} to apply kws/1")
        js = nc.jetstream()
        buckets = {b: await js.key_value(b)
                   for b in (ASSIGNMENTS_BUCKET, MANIFESTS_BUCKET, ROOTS_BUCKET)}
        targets = [(ASSIGNMENTS_BUCKET, device), (MANIFESTS_BUCKET, proto.manifest_key("kws", "1")),
                   (ROOTS_BUCKET, ROOT_LATEST_KEY)]
        before = {t: (await buckets[t[0]].get(t[1])).value for t in targets}
        assert before[(ASSIGNMENTS_BUCKET, device)] == \
            ledger_kinds(fleet, ev.DEVICE_ASSIGNED)[-1].payload["assignment"]
        for bucket, key in targets:
            await buckets[bucket].delete(key)
        for bucket, key in targets:
            with pytest.raises(KeyNotFoundError):
                await buckets[bucket].get(key)

        async def restored() -> bool:
            for bucket, key in targets:
                try:
                    if (await buckets[bucket].get(key)).value != before[(bucket, key)]:
                        return False
                except KeyNotFoundError:
                    return False
            return True

        await until(restored, 3 * RECONCILE_S + 5, "the deleted keys to be put back")
        # Quiet afterwards: a round with nothing changed reads nothing and writes nothing.
        rounds = fleet.hub.reconciler.rounds

        async def quiet_round() -> bool:
            r = fleet.hub.reconciler
            return r.rounds > rounds + 1 and r.last.skipped

        await until(quiet_round, 5 * RECONCILE_S + 5, "a round that skips")
    finally:
        await nc.close()
        await sim.stop()

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


def assignment_of(entry: Any) -> proto.Assignment:
    doc = proto.SignedEnvelope.decode(entry.payload["assignment"]).document("assignment")
    return proto.Assignment.from_map(doc)


@pytest.fixture
async def short_lived(tmp_path: Path, hub_home: HubConfig, nats_server: EmbeddedNats
                      ) -> AsyncIterator[Fleet]:
    """A fleet whose assignments live 3 s (renewed with 1 s left)."""
    configure(hub_home, reconcile_every_seconds=RECONCILE_S,
              kv_write_give_up_seconds=GIVE_UP_S, assignment_ttl_seconds=3.0)
    fleet = await Fleet(tmp_path, nats_server.url).start()
    try:
        yield fleet
    finally:
        await fleet.stop()


async def test_live_assignments_are_renewed_before_they_expire(
    tmp_path: Path, short_lived: Fleet, model_files: dict[str, Path],
) -> None:
    fleet = short_lived
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 1,
                   prefix="renew", rate=2.0)
    device = sim.ids[0]
    try:
        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            await sim.enroll(admin)
            await sim.start()
            await admin.call("deploy", {"model": "kws", "version": "1", "devices": [device]})

        def renewed(entries: list[Any]) -> bool:
            return any(e.payload.get("reason") == "renewed before expiry"
                       for e in fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device))

        await fleet.feed.wait_for(renewed, timeout=30, what="a renewed assignment")
        assigned = fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device)
        first = assignment_of(assigned[0])
        second = assignment_of(next(e for e in assigned if e.payload.get("resigned")))
        assert second.issued_at < first.expires  # before expiry
        assert second.counter == first.counter + 1
        assert (second.model, second.version, second.digest) == \
            (first.model, first.version, first.digest)
        assert second.expires > first.expires
        await fleet.feed.wait_for(
            lambda _: any(e.payload["counter"] == second.counter
                          for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device)),
            timeout=30, what="the device to apply the renewed assignment")
        assert not fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, device)
    finally:
        await sim.stop()


async def test_a_device_restarted_with_its_assignment_expired_keeps_running(
    tmp_path: Path, short_lived: Fleet, model_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The device was off while its assignment expired and nothing renewed it (say the
    hub was down too). At its next start it keeps running its model and reports no
    failure; when the renewed assignment comes, it applies it."""
    from edge_agent import update

    monkeypatch.setattr(update, "EXPIRY_SKEW_NS", 0)  # see an expiry within seconds
    fleet = short_lived
    reconciler = fleet.hub.reconciler
    renew = reconciler.renew

    async def no_renewal() -> list[str]:
        return []

    monkeypatch.setattr(reconciler, "renew", no_renewal)
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 1,
                   prefix="aged", rate=2.0)
    device = sim.ids[0]
    try:
        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            await sim.enroll(admin)
            await sim.start()
            await admin.call("deploy", {"model": "kws", "version": "1", "devices": [device]})
        await fleet.feed.wait_for(
            lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device)), timeout=60,
            what=f"{device} to apply kws/1")
        await sim.stop()
        first = assignment_of(fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device)[-1])

        async def expired() -> bool:
            return time.time_ns() > first.expires

        await until(expired, 10, "the installed assignment to expire")
        await sim.start()
        await sim.wait_watching(timeout=30)
        agent = sim.agents[device]
        assert agent.model is not None  # serving the installed model

        monkeypatch.setattr(reconciler, "renew", renew)  # the hub renews again
        await fleet.feed.wait_for(
            lambda _: any(e.payload["counter"] > first.counter
                          for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device)),
            timeout=30, what="the renewed assignment to be applied")
        assert agent.model is not None
        failed = fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, device)
        assert not failed, [e.payload.get("reason") for e in failed]
    finally:
        await sim.stop()

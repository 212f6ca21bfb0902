"""Rollout scenarios: a real nats-server, a real hub (controller, telemetry ingest), and
a simulated fleet of in-process agents (testkit.fleet_sim) with real TFLite inference.

Every wait is on a ledger event (or a counted state) with a timeout; fault injection is
per device. Fleets are kept small (50 devices, 2-4 inferences/s each) so two cores cope.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hub import events as ev
from hub.devices import state as device_state
from hub.rebuild import live_digest, rebuild_digest
from hub.rollouts import state as rs
from ledger.entry import Entry
from testkit.fleet_sim import SimFleet
from testkit.modelgen import write_validation_set
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)

N = 50


class World:
    def __init__(self, fleet: Fleet, sim: SimFleet, nats: EmbeddedNats) -> None:
        self.fleet = fleet
        self.sim = sim
        self.nats = nats

    def events(self, kind: str, rollout: str | None = None) -> list[Entry]:
        """From the hub's own ledger (the live feed can miss entries while NATS is down)."""
        return [e for e in self.fleet.hub.store.iter_entries()
                if e.kind == kind and (rollout is None or e.payload.get("rollout") == rollout)]

    async def wait_event(self, kind: str, rollout: str, timeout: float = 90.0) -> Entry:
        async def until() -> Entry:
            while True:
                found = self.events(kind, rollout)
                if found:
                    return found[0]
                await asyncio.sleep(0.1)

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            status = await self.call("rollout.status", {"rollout": rollout})
            raise AssertionError(
                f"no {kind} for {rollout}; state {status['rollout']['state']}, waves "
                f"{[(w['state'], w['counts']) for w in status['waves']]}") from None

    async def call(self, verb: str, body: dict[str, Any] | None = None) -> Any:
        async with await self.fleet.client() as client:
            return await client.call(verb, body or {})

    async def release(self, path: Path, version: str) -> None:
        """register -> validate (a large validation set: a steady reference histogram)
        -> approve -> release."""
        fleet = self.fleet
        async with await fleet.client() as admin, \
                await fleet.client(fleet.approver_key) as approver:
            await admin.register_model(path, "kws", version)
            data = write_validation_set(path, fleet.root / f"val-{version}.npz", rows=1000)
            assert (await admin.validate_model("kws", version, data))["passed"]
            await approver.call("model.approve", {"name": "kws", "version": version})
            await admin.call("model.release", {"name": "kws", "version": version})

    async def rollout(self, version: str, start: bool = True, **options: Any) -> str:
        body = {"model": "kws", "version": version, "target": "group=lab", "waves": "100%",
                "min_success": 1.0, "max_failure": 0.0, "deadline": "60s", **options}
        rid = str((await self.call("rollout.create", body))["rollout"])
        if start:
            await self.call("rollout.start", {"rollout": rid})
        return rid

    def running(self) -> dict[str, str]:
        with self.fleet.hub.store.engine.connect() as conn:
            return {d["device"]: d["version"] or "" for d in device_state.list_devices(conn)}

    def members(self, rid: str) -> list[dict[str, Any]]:
        with self.fleet.hub.store.engine.connect() as conn:
            return rs.list_rollout_devices(conn, rid)


@pytest.fixture
async def world(tmp_path: Path, nats_server: EmbeddedNats, model_files: dict[str, Path]
                ) -> AsyncIterator[World]:
    """50 simulated devices in group `lab`, all running kws/1 (rolled out in one wave)."""
    fleet = await Fleet(tmp_path, nats_server.url).start()
    # 5 reference bins: PSI is judged after 100 output samples (20 per bin).
    policy = fleet.config.policy_path
    policy.write_text(policy.read_text().replace("[default]\n", "[default]\nhistogram_bins = 5\n"))
    sim = SimFleet(nats_server.url, tmp_path / "sim", fleet.config.trust_root_path, N,
                   rate=4.0, window=0.5)
    w = World(fleet, sim, nats_server)
    try:
        await w.release(model_files["1"], "1")
        await w.release(model_files["2"], "2")
        async with await fleet.client() as admin:
            await sim.enroll(admin, group="lab", tags={"site": "a"})
        await sim.start()
        rid = await w.rollout("1")
        await w.wait_event(ev.ROLLOUT_COMPLETED, rid)
        assert set(w.running().values()) == {"1"}
        yield w
    finally:
        await sim.stop()
        await fleet.stop()


def wave_numbers(w: World, rid: str) -> list[dict[str, Any]]:
    return [e.payload["evidence"] for e in w.events(ev.ROLLOUT_WAVE_COMPLETED, rid)]


async def test_a_good_model_rolls_through_every_wave_with_its_numbers_in_the_ledger(
    world: World,
) -> None:
    rid = await world.rollout("2", waves="10%,50%,100%", bake="1s", min_success=0.95,
                              max_failure=0.05, max_error_rate=0.05, max_psi=0.25,
                              min_inferences=20)
    done = await world.wait_event(ev.ROLLOUT_COMPLETED, rid)
    assert done.actor == ev.CONTROLLER_ACTOR
    started = world.events(ev.ROLLOUT_WAVE_STARTED, rid)
    assert [len(e.payload["devices"]) for e in started] == [5, 20, 25]
    assert len(world.events(ev.ROLLOUT_WAVE_BAKING, rid)) == 3
    numbers = wave_numbers(world, rid)
    assert [n["devices"] for n in numbers] == [5, 20, 25]
    for n in numbers:
        assert n["success_rate"] >= 0.95 and n["failure_rate"] == 0.0
        assert n["inferences"] >= 20 and n["psi"] < 0.25 and n["error_rate"] == 0.0
    assert set(world.running().values()) == {"2"}
    # Deterministic membership: the ledger's wave lists are what anyone can recompute.
    from hub.rollouts.rules import parse_waves, split_waves

    plan = split_waves(rid, sorted(world.sim.ids), parse_waves("10%,50%,100%"))
    assert [sorted(e.payload["devices"]) for e in started] == [sorted(p) for p in plan]
    # Status, metrics and the rebuilt state agree with the ledger.
    status = await world.call("rollout.status", {"rollout": rid})
    assert status["rollout"]["state"] == "completed"
    assert [w["state"] for w in status["waves"]] == ["done"] * 3
    rebuilt, _ = rebuild_digest(world.fleet.hub.store)
    assert rebuilt == live_digest(world.fleet.hub.store)


async def test_a_model_failing_on_a_fifth_of_devices_halts_in_wave_one_and_rolls_back(
    world: World,
) -> None:
    rid = await world.rollout("2", start=False, waves="10%,50%,100%", min_success=0.95,
                              max_failure=0.05, auto_rollback=True)
    plan = await world.call("rollout.status", {"rollout": rid, "devices": True})
    assert "devices" not in await world.call("rollout.status", {"rollout": rid})
    assert plan["device_count"] == N and plan["next_offset"] is None
    first = [d["device"] for d in plan["devices"] if d["wave"] == 0]
    rest = [d["device"] for d in plan["devices"] if d["wave"] != 0]
    failing = [first[0], *rest[: N // 5 - 1]]  # 20% of the fleet, one of them in wave 1
    world.sim.inject(failing, install_error=True, version="2")
    await world.call("rollout.start", {"rollout": rid})
    halted = await world.wait_event(ev.ROLLOUT_HALTED, rid)
    assert halted.payload["wave"] == 0 and "failure rate" in halted.payload["reason"]
    assert halted.payload["evidence"]["failed"] >= 1
    assert halted.payload["evidence"]["failure_rate"] > 0.05
    back = await world.wait_event(ev.ROLLOUT_ROLLED_BACK, rid)
    assert back.payload["auto"] is True and back.actor == ev.CONTROLLER_ACTOR
    assert len(world.events(ev.ROLLOUT_WAVE_STARTED, rid)) == 1  # no second wave
    # Every device that took (or might still take) v2 is given v1 again and runs it.
    rolled = set(back.payload["devices"])
    assert rolled and rolled <= set(first) and first[0] not in rolled

    def rows() -> dict[str, dict[str, Any]]:
        return {r["device"]: r for r in world.members(rid)}

    async def all_back_on_v1() -> None:
        while any(rows()[d]["rollback_state"] != "applied" for d in rolled) or any(
                v != "1" for v in world.running().values()):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(all_back_on_v1(), 60)
    assert rows()[first[0]]["state"] == "failed"
    assert all(a.model_meta.get("version") == "1" for a in world.sim.agents.values())


async def test_a_drifting_model_halts_during_bake(world: World) -> None:
    world.sim.inject(world.sim.ids, output_shift=25.0, version="2")
    rid = await world.rollout("2", waves="10%,100%", bake="30s", min_success=0.95,
                              max_failure=0.05, max_psi=0.25, min_inferences=20)
    baking = await world.wait_event(ev.ROLLOUT_WAVE_BAKING, rid)
    halted = await world.wait_event(ev.ROLLOUT_HALTED, rid)
    assert halted.seq > baking.seq and halted.payload["wave"] == 0
    assert "output drift PSI" in halted.payload["reason"]
    assert halted.payload["evidence"]["psi"] > 0.25
    assert (halted.ts - baking.ts) / 1e9 < 30  # during the bake, not after it
    status = await world.call("rollout.status", {"rollout": rid, "devices": True})
    assert status["rollout"]["state"] == "halted"
    assert [w["state"] for w in status["waves"]] == ["halted", "pending"]
    # The operator decides: roll back by hand.
    result = await world.call("rollout.rollback", {"rollout": rid, "reason": "drift"})
    wave_one = [d["device"] for d in status["devices"] if d["wave"] == 0]
    assert sorted(result["devices"]) == sorted(wave_one)


async def test_nats_restart_mid_rollout_completes_and_loses_no_telemetry(world: World) -> None:
    rid = await world.rollout("2", waves="20%,60%,100%", bake="1s", min_success=0.95,
                              max_failure=0.05, max_error_rate=0.05, min_inferences=10)
    await world.wait_event(ev.ROLLOUT_WAVE_COMPLETED, rid)
    await asyncio.to_thread(world.nats.restart)
    await world.wait_event(ev.ROLLOUT_COMPLETED, rid, timeout=150)
    assert set(world.running().values()) == {"2"}
    await world.sim.quiesce(timeout=60)
    hub = world.fleet.hub
    produced = world.sim.produced()

    async def counted() -> None:
        while hub.telemetry.inferences_total != produced:
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(counted(), 60)
    except TimeoutError:
        raise AssertionError(f"hub counted {hub.telemetry.inferences_total}, agents "
                             f"produced {produced}") from None
    assert hub.telemetry.dropped_total == 0
    windows = sum(a.windows for a in world.sim.agents.values())
    assert hub.telemetry.windows_total == windows


async def test_targeting_overlap_joiners_and_metrics(world: World, tmp_path: Path) -> None:
    # Overlapping rollouts are refused with a clear message.
    rid = await world.rollout("2", start=False, waves="100%")
    from hub.errors import HubError

    with pytest.raises(HubError, match=f"already in active rollout.*{rid}.*one active "
                                       "rollout per device"):
        await world.rollout("2", start=False, target="tag:site=a")
    # So is a direct deploy to a device inside it, and the ledger does not change.
    before = world.fleet.hub.store.count()
    with pytest.raises(HubError, match=f"in active rollout {rid}.*hub rollout abort {rid}"):
        await world.call("deploy", {"model": "kws", "version": "2", "devices": ["sim-0000"]})
    assert world.fleet.hub.store.count() == before
    await world.call("rollout.abort", {"rollout": rid, "reason": "changed my mind"})
    # A device that joins the target during a rollout gets the rollout's release.
    rid = await world.rollout("2", waves="10%,100%", bake="2s", target="group=lab")
    await world.wait_event(ev.ROLLOUT_WAVE_STARTED, rid)
    extra = SimFleet(world.sim.nats_url, tmp_path / "extra", world.sim.trust_root, 1,
                     prefix="late")
    async with await world.fleet.client() as admin:
        await extra.enroll(admin, group="lab")
    await extra.start()
    try:
        added = await world.wait_event(ev.ROLLOUT_DEVICE_ADDED, rid)
        assert added.payload["device"] == "late-0000"
        await world.wait_event(ev.ROLLOUT_COMPLETED, rid)
        assert world.running()["late-0000"] == "2"
    finally:
        await extra.stop()
    # Prometheus metrics from the same state.
    from hub.telemetry.metrics import MetricsServer

    server = MetricsServer(world.fleet.hub.metrics.registry, "127.0.0.1", 0)
    port = await server.start()
    try:
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
            .read().decode())
    finally:
        await server.stop()
    assert f'fleet_devices{{model="kws",version="2"}} {float(N + 1)}' in text
    assert f'fleet_rollout_info{{model="kws",rollout="{rid}",version="2"}} 1.0' in text
    assert f'fleet_rollout_state{{rollout="{rid}",state="completed"}} 1.0' in text
    assert 'fleet_inferences_total{model="kws",version="2"}' in text
    assert "fleet_telemetry_ingest_lag_seconds " in text
    # `hub telemetry` data for one device.
    view = await world.call("telemetry", {"device": "sim-0000"})
    assert {r["version"] for r in view["devices"]} >= {"1", "2"}


async def test_an_operator_drives_a_rollout_from_the_cli(world: World) -> None:
    """As a new user would: create, start, watch it to the end (exit 0), list it, see
    each device's wave; then a second rollout paused, resumed and aborted by hand."""
    from tests.test_cli import run

    home = str(world.fleet.config.home)

    def hub(*args: str, timeout: float = 120) -> Any:
        return asyncio.to_thread(run, "hub.cli", *args, "--home", home, timeout=timeout)

    created = await hub("rollout", "create", "--model", "kws", "--version", "2", "--target",
                        "group=lab", "--waves", "50%,100%", "--min-success", "1.0",
                        "--max-failure", "0", "--deadline", "60s", "--json")
    assert created.returncode == 0, created.stderr
    rid = json.loads(created.stdout)["rollout"]
    started = await hub("rollout", "start", rid)
    assert started.returncode == 0, started.stderr
    watched = await hub("rollout", "status", rid, "--watch", "--interval", "0.3")
    assert watched.returncode == 0, watched.stdout + watched.stderr  # completed
    assert rid in watched.stdout and "done" in watched.stdout
    listed = await hub("rollout", "list")
    assert listed.returncode == 0 and rid in listed.stdout and "completed" in listed.stdout
    detail = await hub("rollout", "status", rid, "--devices", "--json")
    assert detail.returncode == 0, detail.stderr
    rows = json.loads(detail.stdout)["devices"]
    assert sorted(r["device"] for r in rows) == sorted(world.sim.ids)
    # 1-based in --json as in the tables (the hub's own API counts from 0).
    assert {r["wave"] for r in rows} == {1, 2} and {r["state"] for r in rows} == {"applied"}

    # Halting by hand: pause (nothing new is assigned), resume, abort.
    second = await hub("rollout", "create", "--model", "kws", "--version", "1", "--target",
                       "group=lab", "--waves", "10%,100%", "--bake", "60s", "--json")
    assert second.returncode == 0, second.stderr
    rid2 = json.loads(second.stdout)["rollout"]
    for verb in ("start", "pause", "resume", "abort"):
        extra = ("--reason", "operator stop") if verb == "abort" else ()
        done = await hub("rollout", verb, rid2, *extra)
        assert done.returncode == 0, (verb, done.stdout, done.stderr)
    status = await world.call("rollout.status", {"rollout": rid2})
    assert status["rollout"]["state"] == "aborted"
    kinds = [e.kind for e in world.fleet.hub.store.iter_entries()
             if e.payload.get("rollout") == rid2]
    assert kinds[:2] == [ev.ROLLOUT_CREATED, ev.ROLLOUT_STARTED]
    assert ev.ROLLOUT_PAUSED in kinds and ev.ROLLOUT_RESUMED in kinds
    assert kinds[-1] == ev.ROLLOUT_ABORTED
    again = await hub("rollout", "start", rid2)  # an aborted rollout stays aborted
    assert again.returncode != 0 and "Traceback" not in again.stderr

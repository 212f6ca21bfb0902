"""Device lifecycle, driven through the `hub` CLI as an operator would (exit codes,
output, --json): revoked devices stay out of rollouts and deploys and stay revoked,
rollback after an abort, `hub device show`, `hub deploy --wait`, `hub status` as a fleet
summary and label selectors.

A real nats-server and hub, and a small simulated fleet (testkit.fleet_sim) with real
TFLite inference. Every wait is on a ledger event or the CLI's own exit, with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy import create_engine

from hub import events as ev
from hub import fold
from hub.devices import state as device_state
from ledger.entry import Entry
from testkit.fleet_sim import SimFleet
from testkit.modelgen import write_validation_set
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet
from tests.test_cli import run

pytestmark = pytest.mark.timeout(240)

N = 4
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class World:
    def __init__(self, fleet: Fleet, sim: SimFleet) -> None:
        self.fleet = fleet
        self.sim = sim
        self.home = str(fleet.config.home)

    def hub(self, *args: str, timeout: float = 120) -> Any:
        """`hub ARGS --home HOME` in a child process (awaitable)."""
        return asyncio.to_thread(run, "hub.cli", *args, "--home", self.home,
                                 timeout=timeout)

    async def hub_json(self, *args: str) -> Any:
        done: subprocess.CompletedProcess[str] = await self.hub(*args, "--json")
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def events(self, kind: str) -> list[Entry]:
        return [e for e in self.fleet.hub.store.iter_entries() if e.kind == kind]

    async def wait_event(self, kind: str, match: dict[str, Any], timeout: float = 90.0
                         ) -> Entry:
        async def until() -> Entry:
            while True:
                for e in self.events(kind):
                    if all(e.payload.get(k) == v for k, v in match.items()):
                        return e
                await asyncio.sleep(0.1)

        return await asyncio.wait_for(until(), timeout)

    async def call(self, verb: str, body: dict[str, Any] | None = None) -> Any:
        async with await self.fleet.client() as client:
            return await client.call(verb, body or {})

    async def release(self, path: Path, version: str) -> None:
        fleet = self.fleet
        async with await fleet.client() as admin, \
                await fleet.client(fleet.approver_key) as approver:
            await admin.register_model(path, "kws", version)
            data = write_validation_set(path, fleet.root / f"val-{version}.npz", rows=200)
            assert (await admin.validate_model("kws", version, data))["passed"]
            await approver.call("model.approve", {"name": "kws", "version": version})
            await admin.call("model.release", {"name": "kws", "version": version})

    def devices(self) -> dict[str, dict[str, Any]]:
        with self.fleet.hub.store.engine.connect() as conn:
            return {d["device"]: d for d in device_state.list_devices(conn)}

    async def wait_running(self, devices: list[str], version: str,
                           timeout: float = 90.0) -> None:
        async def until() -> None:
            while not all(self.devices()[d]["version"] == version
                          and self.devices()[d]["state"] == "applied" for d in devices):
                await asyncio.sleep(0.1)

        await asyncio.wait_for(until(), timeout)


@pytest.fixture
async def world(tmp_path: Path, nats_server: EmbeddedNats, model_files: dict[str, Path]
                ) -> AsyncIterator[World]:
    """N simulated devices: sim-0000..1 in group `prod` at site a, sim-0002..3 in group
    `lab` at site b, all running kws/1 (a direct deploy); kws/2 is released too."""
    fleet = await Fleet(tmp_path, nats_server.url).start()
    sim = SimFleet(nats_server.url, tmp_path / "sim", fleet.config.trust_root_path, N,
                   rate=4.0, window=0.5)
    w = World(fleet, sim)
    try:
        await w.release(model_files["1"], "1")
        await w.release(model_files["2"], "2")
        async with await fleet.client() as admin:
            await sim.enroll(admin)
            for i, device in enumerate(sim.ids):
                group, site = ("prod", "a") if i < N // 2 else ("lab", "b")
                await admin.call("device.tag", {"device": device, "group": group,
                                                "tags": {"site": site}})
        await sim.start()
        await w.call("deploy", {"model": "kws", "version": "1", "all": True})
        await w.wait_running(sim.ids, "1")
        yield w
    finally:
        await sim.stop()
        await fleet.stop()


def error_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    message = " ".join(done.stderr.split())
    assert message.startswith("error:"), done.stderr
    for word in words:
        assert word in message, done.stderr
    return message


# ---------------------------------------------------------------- revoked devices


async def test_a_revoked_device_stays_out_of_rollouts_and_deploys_and_stays_revoked(
    world: World,
) -> None:
    gone = world.sim.ids[-1]
    revoked = await world.hub("device", "revoke", gone, "--reason", "lost in transit")
    assert revoked.returncode == 0, revoked.stderr
    revoked_seq = world.events(ev.DEVICE_REVOKED)[-1].seq

    # A deploy to it by id is refused, naming why; --all skips it and says so.
    by_id = await world.hub("deploy", "kws/2", "--device", gone)
    error_line(by_id, 1, gone, "revoked")
    everyone = await world.hub_json("deploy", "kws/1", "--all")
    assert gone not in everyone["devices"] and everyone["skipped_revoked"] == [gone]
    plain = await world.hub("deploy", "kws/1", "--all")
    assert plain.returncode == 0 and "1 revoked device(s) skipped" in plain.stdout

    # A rollout over a selector that matches it runs to completion without it.
    created = await world.hub_json("rollout", "create", "kws/2", "--target", "all",
                                   "--waves", "50%,100%", "--min-success", "1.0",
                                   "--max-failure", "0", "--deadline", "20s")
    assert created["devices"] == N - 1
    rid = created["rollout"]
    assert (await world.hub("rollout", "start", rid)).returncode == 0
    watched = await world.hub("rollout", "status", rid, "--watch", "--interval", "0.3")
    assert watched.returncode == 0, watched.stdout + watched.stderr

    # Still revoked, in the device list and (below) in `hub device show`.
    listed = await world.hub_json("devices", "--all")
    states = {d["device"]: d["state"] for d in listed["devices"]}
    assert states[gone] == "revoked"
    assert all(states[d] == "applied" for d in world.sim.ids[:-1])
    assert listed["states"]["revoked"] == 1
    shown = await world.hub_json("device", "show", gone)
    assert shown["state"] == "revoked" and shown["last_error"] == "lost in transit"
    assert shown["running"]["version"] == "1" and shown["assigned"]["version"] == "1"
    text = await world.hub("device", "show", gone)
    assert text.returncode == 0 and "revoked" in text.stdout
    # No assignment was signed for it after the revocation.
    assert not [e for e in world.events(ev.DEVICE_ASSIGNED)
                if e.payload["device"] == gone and e.seq > revoked_seq]
    rebuilt = await world.hub_json("rebuild")
    assert rebuilt["equal"], rebuilt


def test_the_fold_never_turns_revoked_back_into_something_else() -> None:
    """Old ledgers may hold events after a revocation (an assignment, a late report):
    the device stays revoked, whatever comes after."""
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        fold.create_tables(conn)
        later = {
            ev.DEVICE_ASSIGNED: {"device": "d1", "counter": 2, "model": "m",
                                 "version": "2", "digest": "ab", "manifest_hash": "cd"},
            ev.DEVICE_UPDATE_APPLIED: {"device": "d1", "counter": 2, "model": "m",
                                       "version": "2", "digest": "ab", "boot": "b",
                                       "report_seq": 1},
            ev.DEVICE_UPDATE_FAILED: {"device": "d1", "counter": 2, "reason": "x",
                                      "boot": "b", "report_seq": 2},
            ev.DEVICE_UPDATE_REVERTED: {"device": "d1", "counter": 2, "model": "m",
                                        "version": "1", "digest": "ef", "reason": "y",
                                        "boot": "b", "report_seq": 3},
            # A token made for the id after its revocation (it cannot be used: the id
            # is enrolled); it touches the token table only.
            ev.DEVICE_TOKEN_CREATED: {"device": "d1", "token_id": "ab" * 8,
                                      "token_hash": "ab" * 32, "expires": 1},
        }
        assert set(later) | {ev.DEVICE_ENROLLED, ev.DEVICE_REVOKED} >= {
            k for k, handlers in fold.HANDLERS.items()
            if any(h in device_state.HANDLERS.values() for h in handlers)}
        steps = [(ev.DEVICE_ENROLLED, {"device": "d1"}),
                 (ev.DEVICE_REVOKED, {"device": "d1", "reason": "lost"}), *later.items()]
        for seq, (kind, payload) in enumerate(steps):
            entry = cast(Entry, SimpleNamespace(seq=seq, ts=seq + 1, kind=kind,
                                                actor="k", payload=payload))
            for handler in fold.HANDLERS.get(kind, ()):
                handler(conn, entry, payload)
            row = device_state.get_device(conn, "d1")
            assert row is not None
            if seq >= 1:
                assert row["state"] == "revoked" and row["last_error"] == "lost", kind


def test_a_device_revoked_after_planning_neither_starts_nor_stalls_its_wave() -> None:
    """Revoked after `rollout create`: its row turns `revoked` (the fold) and the wave
    starts without it; a wave whose every device was revoked completes."""
    from hub.rollouts import rules as ro

    policy = ro.Policy(min_success=1.0, max_failure=0.0, deadline_s=10)
    pending = ro.WaveView(0, ro.WAVE_PENDING, {"a": ro.DEV_PLANNED, "b": ro.DEV_REVOKED})
    start = ro.decide(policy, [pending], ro.TelemetryView(), 0)
    assert (start.action, start.devices) == (ro.ACT_START_WAVE, ("a",))
    rolling = ro.WaveView(0, ro.WAVE_ROLLING, {"a": ro.DEV_APPLIED, "b": ro.DEV_REVOKED})
    assert ro.decide(policy, [rolling], ro.TelemetryView(), 1).action == ro.ACT_COMPLETE_WAVE
    empty = ro.WaveView(0, ro.WAVE_ROLLING, {"b": ro.DEV_REVOKED})
    assert ro.decide(policy, [empty], ro.TelemetryView(), 1).action == ro.ACT_COMPLETE_WAVE


# ---------------------------------------------------------------- rollback after abort


async def test_rollback_after_abort_gives_the_devices_that_took_it_their_previous_release(
    world: World,
) -> None:
    helped = await world.hub("rollout", "abort", "--help")
    assert helped.returncode == 0 and "rollout rollback" in " ".join(helped.stdout.split())
    created = await world.hub_json("rollout", "create", "kws/2", "--target", "all",
                                   "--waves", "50%,100%", "--bake", "300s",
                                   "--min-success", "1.0", "--max-failure", "0")
    rid = created["rollout"]
    assert (await world.hub("rollout", "start", rid)).returncode == 0
    first = (await world.wait_event(ev.ROLLOUT_WAVE_BAKING, {"rollout": rid})).payload
    wave1 = sorted(e.payload["device"] for e in world.events(ev.DEVICE_ASSIGNED)
                   if e.payload.get("rollout") == rid)
    assert len(wave1) == N // 2 and first["wave"] == 0
    await world.wait_running(wave1, "2")
    aborted = await world.hub("rollout", "abort", rid, "--reason", "wrong release")
    assert aborted.returncode == 0, aborted.stderr

    rolled = await world.hub_json("rollout", "rollback", rid, "--reason", "back to 1")
    assert sorted(rolled["devices"]) == wave1 and rolled["state"] == "rolled_back"
    await world.wait_running(world.sim.ids, "1")
    # The second wave never started: only wave 1's devices ever got kws/2.
    got_two = {e.payload["device"] for e in world.events(ev.DEVICE_ASSIGNED)
               if e.payload["version"] == "2"}
    assert sorted(got_two) == wave1
    again = await world.hub("rollout", "rollback", rid)
    error_line(again, 1, "rolled_back", "nothing more can happen")


# ---------------------------------------------------------------- hub device show


def check_device_document(doc: dict[str, Any]) -> None:
    """The documented shape of `hub device show --json` (docs/CLI-JSON.md)."""
    assert set(doc) == {"device", "state", "last_error", "enrolled_seq", "updated", "group",
                        "tags", "assigned", "running", "trust_root_version", "rollout",
                        "telemetry", "reports", "history"}
    assert doc["updated"] is None or RFC3339.fullmatch(doc["updated"])
    if doc["running"] is not None:
        assert set(doc["running"]) == {"model", "version", "digest"}
        assert len(doc["running"]["digest"]) == 64  # full, never cut
    if doc["telemetry"] is not None:
        assert set(doc["telemetry"]) == {"last_seen", "boot", "window_seq", "inferences",
                                         "errors", "latency_ms_p95"}
        assert RFC3339.fullmatch(doc["telemetry"]["last_seen"])
    for r in doc["reports"]:
        assert set(r) == {"seq", "time", "event", "model", "version", "digest", "counter",
                          "reason"}
        assert RFC3339.fullmatch(r["time"]) and len(r["digest"]) == 64


async def test_device_show_says_what_a_device_runs_its_tags_reports_and_telemetry(
    world: World,
) -> None:
    device = world.sim.ids[0]

    async def telemetry_seen() -> None:
        while not (world.devices()[device].get("inferences") or 0):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(telemetry_seen(), 60)
    doc = await world.hub_json("device", "show", device)
    check_device_document(doc)
    assert doc["state"] == "applied" and doc["running"]["version"] == "1"
    assert (doc["group"], doc["tags"]) == ("prod", {"site": "a"})
    assert doc["trust_root_version"] is None and doc["telemetry"]["inferences"] > 0
    assert doc["reports"][-1]["event"] == ev.DEVICE_UPDATE_APPLIED
    assert doc["history"] == f"hub device history {device}"
    text = await world.hub("device", "show", device)
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())
    for words in (f"{device} applied", "running: kws/1", "trust root: not reported",
                  "group: prod; tags: site=a", "last status reports", "last window",
                  f"history: hub device history {device}"):
        assert words in flat, text.stdout
    missing = await world.hub("device", "show", "nobody")
    error_line(missing, 1, "no device nobody is enrolled")


# ---------------------------------------------------------------- hub deploy --wait


async def test_deploy_wait_exits_0_when_all_apply_1_when_any_fails_3_on_timeout(
    world: World,
) -> None:
    helped = await world.hub("deploy", "--help")
    flat = " ".join(helped.stdout.split())
    assert "0 every device applied it, 1 any failed" in flat and "3 --wait-timeout" in flat

    everyone = await world.hub_json("deploy", "kws/2", "--all", "--wait", "--interval", "0.2")
    assert everyone["counts"]["applied"] == N and not everyone["timed_out"]
    assert {d["state"] for d in everyone["devices"].values()} == {"applied"}

    bad, good = world.sim.ids[:2]
    world.sim.inject([bad], install_error=True, version="1")
    mixed = await world.hub("deploy", "kws/1", "--device", bad, "--device", good, "--wait",
                            "--interval", "0.2")
    assert mixed.returncode == 1, mixed.stdout + mixed.stderr
    text = " ".join(mixed.stdout.split())
    assert "1 applied, 1 failed" in text and f"{bad}: failed" in text

    # A device that never comes online: the wait gives up with exit 3.
    enrolled = await world.hub("device", "enroll", "offline-1")
    assert enrolled.returncode == 0, enrolled.stderr
    stuck = await world.hub("deploy", "kws/1", "--device", "offline-1", "--wait",
                            "--wait-timeout", "2", "--interval", "0.2", "--json")
    assert stuck.returncode == 3, stuck.stdout + stuck.stderr
    summary = json.loads(stuck.stdout)
    assert summary["timed_out"] and summary["devices"]["offline-1"]["state"] == "pending"


# ---------------------------------------------------------------- hub status


async def test_status_summarises_the_fleet(world: World) -> None:
    created = await world.hub_json("rollout", "create", "kws/2", "--target", "group=lab")
    doc = await world.hub_json("status")
    assert doc["devices"] == {"applied": N}
    assert [(r["rollout"], r["state"]) for r in doc["rollouts"]] == [
        (created["rollout"], "created")]
    assert doc["nats"]["reachable"] and doc["database"] == {"reachable": True, "error": None}
    assert {t["name"]: t["state"] for t in doc["tasks"]}.items() >= {
        "reports": "running", "rollouts": "running", "checkpointer": "running"}.items()
    assert all(RFC3339.fullmatch(t["since"]) for t in doc["tasks"])
    assert doc["witnesses"] == []
    if doc["checkpoint"] is not None:
        assert RFC3339.fullmatch(doc["checkpoint"]["time"])
        assert doc["checkpoint"]["witnesses"] == []
    text = await world.hub("status")
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())
    for words in (f"devices: {N} ({N} applied)", "active rollouts: 1",
                  f"{created['rollout']} kws/2 created", "NATS reachable, database reachable",
                  "checkpoint:", "rollouts"):
        assert words in flat, text.stdout


# ---------------------------------------------------------------- label selectors


async def test_label_selectors_on_devices_and_rollout_create(world: World) -> None:
    prod, lab = world.sim.ids[:N // 2], world.sim.ids[N // 2:]
    page = await world.hub_json("devices", "-l", "group=prod,site=a")
    assert [d["device"] for d in page["devices"]] == prod
    assert page["device_count"] == len(prod) and page["states"] == {"applied": len(prod)}
    by_tag = await world.hub_json("devices", "--selector", "site=b", "--state", "applied")
    assert [d["device"] for d in by_tag["devices"]] == lab
    none = await world.hub_json("devices", "-l", "group=prod,site=b")
    assert none["devices"] == [] and none["device_count"] == 0
    text = await world.hub("devices", "-l", "group=lab")
    assert text.returncode == 0 and all(d in text.stdout for d in lab)
    assert not any(d in text.stdout for d in prod)

    created = await world.hub_json("rollout", "create", "kws/2", "-l", "group=lab,site=b")
    assert created["devices"] == len(lab)
    status = await world.call("rollout.status", {"rollout": created["rollout"],
                                                 "devices": True})
    assert sorted(d["device"] for d in status["devices"]) == lab
    assert status["rollout"]["target"] == "group=lab,tag:site=b"
    bad = await world.hub("devices", "-l", "group")
    error_line(bad, 1, "invalid label 'group'", "KEY=VALUE")

"""The hub on PostgreSQL: the same story as on SQLite, end to end, with the ledger and
every projection in a real (throwaway) PostgreSQL database: lifecycle, enrolment, a
rollout in waves to simulated agents with real TFLite, telemetry, `hub rebuild`'s state
digest, and a hub restart that picks up where the database says it was."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from hub import events as ev
from hub.devices import state as device_state
from hub.home.config import HubConfig
from hub.rebuild import live_digest, rebuild_digest
from hub.service.app import HubService
from hub.telemetry.ingest import AGG
from ledger.storage.checkpoint_store import CheckpointStore
from ledger.storage.store import LedgerStore
from testkit.fleet_sim import SimFleet
from testkit.nats_server import EmbeddedNats
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)
N = 12


def use_database(config: HubConfig, url: str) -> None:
    path = config.home / "config.toml"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(f'database = "{url}"' if ln.startswith("database") else ln
                              for ln in lines) + "\n")


@pytest.fixture
async def pg_fleet(hub_home: HubConfig, fresh_pg_url: str, nats_server: EmbeddedNats,
                   tmp_path: Path) -> AsyncIterator[Fleet]:
    use_database(hub_home, fresh_pg_url)
    fleet = await Fleet(tmp_path, nats_server.url).start()
    try:
        yield fleet
    finally:
        await fleet.stop()


async def wait_for(fleet: Fleet, kind: str, rollout: str, timeout: float = 90) -> None:
    async def until() -> None:
        while not any(e.kind == kind and e.payload.get("rollout") == rollout
                      for e in fleet.hub.store.iter_entries()):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(until(), timeout)


async def telemetry_counted(fleet: Fleet) -> None:
    while True:
        with fleet.hub.store.engine.connect() as conn:
            total = conn.execute(select(func.sum(AGG.c.inferences))).scalar()
        if total:
            return
        await asyncio.sleep(0.2)


async def test_the_hub_runs_on_postgresql(
    pg_fleet: Fleet, model_files: dict[str, Path], tmp_path: Path
) -> None:
    fleet = pg_fleet
    assert fleet.hub.store.engine.dialect.name == "postgresql"
    for version in ("1", "2"):
        await fleet.release_model(model_files[version], "kws", version)
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, N,
                   rate=4.0, window=0.5)
    try:
        async with await fleet.client() as admin:
            await sim.enroll(admin, group="lab")
            await sim.start()
            rollouts: list[str] = []
            for version, waves in (("1", "100%"), ("2", "50%,100%")):
                body: dict[str, Any] = {
                    "model": "kws", "version": version, "target": "group=lab",
                    "waves": waves, "min_success": 1.0, "max_failure": 0.0, "deadline": "60s"}
                rid = str((await admin.call("rollout.create", body))["rollout"])
                await admin.call("rollout.start", {"rollout": rid})
                await wait_for(fleet, ev.ROLLOUT_COMPLETED, rid)
                rollouts.append(rid)
            with fleet.hub.store.engine.connect() as conn:
                running = {d["device"]: d["version"] for d in device_state.list_devices(conn)}
            assert running == {d: "2" for d in sim.ids}
            status = await admin.call("rollout.status", {"rollout": rollouts[1]})
            assert [w["state"] for w in status["waves"]] == ["done", "done"]
            # Telemetry from the agents is counted in the PostgreSQL aggregates.
            await asyncio.wait_for(telemetry_counted(fleet), 60)
    finally:
        await sim.stop()

    # The projections are a fold of the ledger, on this backend too.
    rebuilt, replayed = rebuild_digest(fleet.hub.store)
    assert live_digest(fleet.hub.store) == rebuilt and replayed == fleet.hub.store.count()
    assert fleet.hub.store.verify().ok
    # A restarted hub reads the same database and serves the same state.
    entries = fleet.hub.store.count()
    await fleet.hub.stop()
    fleet.hub = HubService(fleet.config)
    await fleet.hub.start()
    async with await fleet.client() as admin:
        assert (await admin.call("status"))["entries"] >= entries
        rows = await admin.call("model.show", {"name": "kws"})
        assert {r["version"]: r["state"] for r in rows} == {"1": "released", "2": "released"}
    with LedgerStore.open(fleet.config.database_url(), create=False) as store:
        assert store.count() >= entries and store.verify().ok
        # The checkpoint the first hub signed as it stopped is in the database too.
        latest = CheckpointStore(store, create=False).latest()
        assert latest is not None and latest.size >= entries
        assert latest.root == store.root(latest.size)

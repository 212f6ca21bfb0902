"""A hub stopped between the ledger commit of an assignment and its KV write: on the
next start it puts the ledger's assignment into KV (hub/devices/assignment_sync.py), so the
device installs it; a further start writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.errors import KeyNotFoundError

from edge_agent.protocol.names import ASSIGNMENTS_BUCKET
from hub import events as ev
from hub.service.app import HubService
from testkit.fleet_sim import SimFleet
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(180)


async def restart_hub(fleet: Fleet) -> HubService:
    await fleet.hub.stop()
    fleet.hub = HubService(fleet.config)
    await fleet.hub.start()
    return fleet.hub


async def test_an_assignment_committed_but_never_put_in_kv_reaches_the_device_after_restart(
    fleet: Fleet, model_files: dict[str, Path], tmp_path: Path,
) -> None:
    await fleet.release_model(model_files["1"], "kws", "1")
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 1,
                   prefix="crash", rate=2.0)
    device = sim.ids[0]
    async with await fleet.client() as admin:
        await sim.enroll(admin)
    await sim.start()
    nc = await fleet.connect()
    try:
        # The crash window: the ledger commits the assignment, the KV write never happens.
        skipped: list[str] = []

        async def hub_died_before_kv(key: str, value: bytes) -> None:
            skipped.append(key)

        fleet.hub.edge.put_assignment = hub_died_before_kv  # type: ignore[method-assign]
        async with await fleet.client() as admin:
            await admin.call("deploy", {"model": "kws", "version": "1", "devices": [device]})
        assert skipped == [device]
        await fleet.feed.wait_for(
            lambda _: bool(fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device)),
            what=f"the assignment of {device} in the ledger")
        kv = await nc.jetstream().key_value(ASSIGNMENTS_BUCKET)
        with pytest.raises(KeyNotFoundError):
            await kv.get(device)

        hub = await restart_hub(fleet)
        assert hub.assignment_sync.restored == [device]
        entry = await kv.get(device)
        assigned = fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device)[-1]
        assert entry.value == assigned.payload["assignment"]  # the ledger's own bytes
        await fleet.feed.wait_for(
            lambda _: bool(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device)), timeout=60,
            what=f"{device} to apply the restored assignment")

        # Idempotent: nothing is missing now, so nothing is written.
        hub = await restart_hub(fleet)
        assert hub.assignment_sync.restored == []
        assert hub.assignment_sync.checked == 1
        assert (await kv.get(device)).revision == entry.revision
    finally:
        await nc.close()
        await sim.stop()


async def test_reconciliation_never_writes_over_a_key_that_moved_after_it_read_it(
    fleet: Fleet, model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The round reads the ledger and the whole bucket (seconds at 10,000 devices), then
    writes what KV lacked; a newer assignment the controller wrote meanwhile must not be
    overwritten with the older one (compare-and-set on the revision it read)."""
    from hub.devices import assignment_sync

    await fleet.release_model(model_files["1"], "kws", "1")
    device = "race-1"
    async with await fleet.client() as admin:
        await admin.call("device.enroll", {"device": device})
        await admin.call("deploy", {"model": "kws", "version": "1", "devices": [device]})
    await fleet.feed.wait_for(lambda _: bool(fleet.feed.of_kind(ev.DEVICE_ASSIGNED, device)),
                              what=f"the assignment of {device} in the ledger")
    nc = await fleet.connect()
    try:
        js = nc.jetstream()
        kv = await js.key_value(ASSIGNMENTS_BUCKET)
        read = (await kv.get(device)).revision
        assert read is not None
        newer = b"written after the round read the bucket"
        await kv.put(device, newer)

        # What the round read: the key unreadable at the old revision, or not there yet.
        for stale in ({device: (-1, read)}, {}):
            async def stale_read(_kv: object, snapshot: dict[str, tuple[int, int]] = stale
                                 ) -> dict[str, tuple[int, int]]:
                return snapshot

            monkeypatch.setattr(assignment_sync, "kv_counters", stale_read)
            result = await assignment_sync.reconcile_assignments(js, fleet.hub.store.engine)
            assert result.restored == []
            assert (await kv.get(device)).value == newer
        monkeypatch.undo()
        # A round that reads the key as it is puts the ledger's assignment back.
        result = await assignment_sync.reconcile_assignments(js, fleet.hub.store.engine)
        assert result.restored == [device]
        assert (await kv.get(device)).value == fleet.feed.of_kind(
            ev.DEVICE_ASSIGNED, device)[-1].payload["assignment"]
    finally:
        await nc.close()

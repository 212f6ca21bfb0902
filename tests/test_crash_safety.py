"""SIGKILL the agent at random points of updates; it must always come back on a valid model.

"Valid" means the active slot's file hashes to the digest its metadata records and the
TFLite runtime loads and runs it. The models carry ~2 MB of padding, so the download,
the child-process preflight and the slot write take long enough for the random kills
(0-400 ms after a deploy) to land inside them.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import blake3
import pytest

from edge_agent import protocol as proto
from edge_agent.runtime import LoadedModel
from edge_agent.slots import SlotStore
from hub import events as ev
from testkit.modelgen import model_for_version
from tests.device_kit import ReportWatch, deploy, deploy_and_wait
from tests.fleet import Fleet

DEVICE = "dev-0"
KILLS = 30


def check_active_model(state_dir: Path) -> str:
    """The active slot is a complete, loadable model; returns its digest."""
    active = SlotStore(state_dir).active()
    assert active is not None, "no active model after a crash"
    digest = blake3.blake3(active.path.read_bytes()).hexdigest()
    assert digest == active.metadata["digest"], f"slot {active.name} does not match its digest"
    LoadedModel.load(active.path).smoke_test()
    return digest


@pytest.mark.timeout(300)
async def test_sigkill_at_random_points_of_updates_never_breaks_the_active_model(
    fleet: Fleet, tmp_path: Path
) -> None:
    seed = int(os.environ.get("FLEET_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    files = {}
    for version in ("1", "2"):
        files[version] = tmp_path / f"kws-big-v{version}.tflite"
        files[version].write_bytes(model_for_version(int(version), extra_bytes=2_000_000))
        await fleet.release_model(files[version], "kws", version)
    digests = {v: blake3.blake3(p.read_bytes()).hexdigest() for v, p in files.items()}

    agent = fleet.agent(DEVICE)
    reports = await ReportWatch.start(fleet.url_as(), DEVICE)
    async with await fleet.client() as client:
        await client.call("device.enroll", {"device": DEVICE})
        agent.start()
        await deploy_and_wait(fleet, client, "1", [DEVICE])
        # Kill points are spread over about one update's length on this machine, timed on
        # an update like the ones below (a fixed window would miss every update on a fast
        # machine, and on a slow one hit none of their ends).
        began = time.monotonic()
        await deploy_and_wait(fleet, client, "2", [DEVICE])
        window = max(0.05, time.monotonic() - began)
        await deploy_and_wait(fleet, client, "1", [DEVICE])

        version, interrupted, reverts = "1", 0, 0
        for i in range(KILLS):
            version = "2" if version == "1" else "1"
            applied_before = len(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE))
            await deploy(client, version, [DEVICE])
            await asyncio.sleep(rng.uniform(0.0, window))  # the random kill point, not a wait
            agent.kill()
            if len(fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)) == applied_before:
                interrupted += 1
            digest = check_active_model(agent.state_dir)
            assert digest in digests.values(), f"kill {i} (seed {seed})"

            mark = reports.mark()
            agent.start()
            started = await reports.status("started", after=mark, timeout=30)
            # Kills in quick succession after a switch are a crash loop: the agent may
            # rightly revert at start (tests/test_health_revert.py), and then says so first.
            reverted = [r for r in reports.reports[mark:] if isinstance(r, proto.StatusReport)
                        and r.boot == started.boot and r.event == proto.STATUS_REVERTED]
            reverts += len(reverted)
            expected = reverted[0].digest if reverted else digest
            assert started.digest == expected, f"kill {i} (seed {seed}): booted another model"

        # A final deploy goes through, and the ledger says so.
        final = "2" if version == "1" else "1"
        await deploy(client, final, [DEVICE])
        counter = fleet.feed.of_kind(ev.DEVICE_ASSIGNED, DEVICE)[-1].payload["counter"]
        await fleet.feed.wait_for(
            lambda _: any(e.payload["counter"] == counter
                          for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, DEVICE)),
            timeout=60, what=f"the final update (counter {counter}) to be applied",
        )
    await reports.close()

    assert check_active_model(agent.state_dir) == digests[final]
    active = SlotStore(agent.state_dir).active()
    assert active is not None and active.metadata["version"] == final
    assert active.metadata["counter"] == counter
    assert interrupted >= KILLS // 4, f"only {interrupted} kills hit an update (seed {seed})"
    # Crashes are not refusals: nothing was reported as a failed update.
    assert fleet.feed.of_kind(ev.DEVICE_UPDATE_FAILED, DEVICE) == [], agent.log()[-3000:]
    assert "internal error" not in agent.log()
    print(f"seed {seed}: {interrupted} of {KILLS} kills interrupted an update, "
          f"{reverts} crash-loop reverts")

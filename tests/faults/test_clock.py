"""Time (issue 13 item 6), on a real hub, a real nats-server and a simulated device,
with an injected clock (hub.clock.OffsetClock; no libfaketime):

- a hub restarted with its wall clock 2 h behind, while a wave bakes for 5 s, ends the
  bake about 5 s after it started again, not 2 h later, and says its clock is behind;
- the rule itself (hub.clock.Stopwatch), pure: elapsed time runs on the monotonic clock
  within a process, and a wall clock behind a recorded instant counts as "just started".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hub import events as ev
from hub.clock import CLOCK_SKEW_NS, OffsetClock, Stopwatch, clock_skew
from hub.service.app import HubService
from testkit.fleet_sim import SimFleet
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(180)

HOUR_NS = 3600 * 10**9
BAKE_S = 5.0


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def kinds(fleet: Fleet, kind: str) -> list[object]:
    return [e for e in fleet.hub.store.iter_entries() if e.kind == kind]


async def test_a_hub_restarted_with_its_clock_2h_behind_ends_a_5s_bake_in_about_5s(
    tmp_path: Path, fleet: Fleet, model_files: dict[str, Path],
) -> None:
    sim = SimFleet(fleet.nats_url, tmp_path / "sim", fleet.config.trust_root_path, 1,
                   prefix="bake", rate=2.0)
    try:
        await fleet.release_model(model_files["1"], "kws", "1")
        async with await fleet.client() as admin:
            await sim.enroll(admin, group="lab")
            await sim.start()
            rid = (await admin.call("rollout.create", {
                "model": "kws", "version": "1", "target": "group=lab", "waves": "100%",
                "min_success": 1.0, "max_failure": 0.0, "deadline": "10m",
                "bake": f"{BAKE_S}s"}))["rollout"]
            await admin.call("rollout.start", {"rollout": rid})
        await until(lambda: bool(kinds(fleet, ev.ROLLOUT_WAVE_BAKING)), 60, "the bake")

        # The hub stops and comes back at once, its wall clock stepped 2 h back.
        await fleet.hub.stop()
        fleet.hub = HubService(fleet.config, clock=OffsetClock(-2 * HOUR_NS))
        restarted = time.monotonic()
        await fleet.hub.start()
        assert fleet.hub.clock_behind_ns > HOUR_NS  # reported, and in `status`

        await until(lambda: bool(kinds(fleet, ev.ROLLOUT_COMPLETED)), 30,
                    "the bake to end (a 2 h wait if the wall clock is trusted)")
        took = time.monotonic() - restarted
        assert took < BAKE_S + 10, took
        assert not kinds(fleet, ev.ROLLOUT_HALTED)
        async with await fleet.client() as admin:
            status = await admin.call("status", {})
        assert status["clock_behind_s"] > 3600
    finally:
        await sim.stop()


class FakeClock:
    def __init__(self) -> None:
        self.wall = 1_000 * HOUR_NS
        self.mono = 0

    def wall_ns(self) -> int:
        return self.wall

    def monotonic_ns(self) -> int:
        return self.mono


def test_elapsed_time_ignores_wall_clock_steps() -> None:
    clock = FakeClock()
    watch = Stopwatch(clock)
    start = clock.wall - 2 * 10**9  # recorded 2 s ago (by the wall clock)
    assert watch.elapsed_ns("bake", start) == 2 * 10**9
    clock.wall -= 2 * HOUR_NS  # stepped back while running: no effect
    clock.mono += 10**9
    assert watch.elapsed_ns("bake", start) == 3 * 10**9
    clock.wall += 4 * HOUR_NS  # stepped forward while running: no effect either
    assert watch.elapsed_ns("bake", start) == 3 * 10**9


def test_a_wall_clock_behind_the_recorded_instant_counts_as_just_started() -> None:
    clock = FakeClock()
    watch = Stopwatch(clock)  # a new process
    recorded = clock.wall + 2 * HOUR_NS  # the ledger says it started "in 2 h"
    assert watch.elapsed_ns("bake", recorded) == 0
    clock.mono += 5 * 10**9
    assert watch.elapsed_ns("bake", recorded) == 5 * 10**9
    now = clock.wall
    assert watch.as_of_now("bake", recorded, now) == now - 5 * 10**9


def test_clock_skew_is_reported_beyond_the_tolerance() -> None:
    assert clock_skew(0, None) == 0
    assert clock_skew(0, CLOCK_SKEW_NS) == 0
    assert clock_skew(0, 2 * HOUR_NS) == 2 * HOUR_NS
    assert clock_skew(2 * HOUR_NS, 0) == 0  # ahead: cannot be told from a long stop

"""The agent's health window runs on elapsed run time, not the wall clock (issue 13, item 6).

A fake clock (boot id, CLOCK_BOOTTIME ns) stands in for the OS; the wall clock is also
stepped by hours around every call to show it plays no part.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.health import HealthWindow, RunTime

pytestmark = pytest.mark.timeout(10)

S = 1_000_000_000
META = {"digest": "d1", "model": "kws", "version": "2", "counter": 7}


class FakeClock:
    def __init__(self) -> None:
        self.now = RunTime("boot-a", 1_000 * S)

    def __call__(self) -> RunTime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now = RunTime(self.now.boot_id, self.now.ns + int(seconds * S))

    def reboot(self, boot_id: str, uptime_s: float = 5.0) -> None:
        self.now = RunTime(boot_id, int(uptime_s * S))


@pytest.fixture
def step_wall_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """Step time.time/time_ns by some seconds (as NTP or a dead RTC battery does)."""
    offset = [0.0]
    real, real_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + int(offset[0] * S))

    def step(seconds: float) -> None:
        offset[0] += seconds

    yield step


def window(tmp_path: Path, clock: FakeClock, seconds: float = 30.0) -> HealthWindow:
    return HealthWindow(tmp_path, seconds, max_error_rate=0.1, clock=clock)


def test_the_window_closes_after_its_run_time_whatever_the_wall_clock_says(
    tmp_path: Path, step_wall_clock: Callable[[float], None],
) -> None:
    clock = FakeClock()
    w = window(tmp_path, clock)
    w.start(META)
    step_wall_clock(+7200)  # forward 2 h: a wall-clock window would close at once
    clock.advance(29)
    assert not w.expired()
    step_wall_clock(-14400)  # back 4 h: a wall-clock window would stay open for hours
    clock.advance(2)
    assert w.expired()


def test_restarts_in_one_boot_are_counted_across_processes(tmp_path: Path) -> None:
    clock = FakeClock()
    window(tmp_path, clock).start(META)
    evidence = None
    for _ in range(3):  # three agent processes, each reading health.json afresh
        clock.advance(2)
        evidence = window(tmp_path, clock).on_boot("d1")
    assert evidence is not None and "crash loop: 3 restarts in 6.0 s" in evidence


def test_restarts_spread_wider_than_the_window_are_not_a_crash_loop(tmp_path: Path) -> None:
    clock = FakeClock()
    window(tmp_path, clock).start(META)
    clock.advance(10)
    assert window(tmp_path, clock).on_boot("d1") is None
    clock.advance(25)  # the window (30 s) has passed: the model is healthy
    assert window(tmp_path, clock).on_boot("d1") is None
    assert window(tmp_path, clock).watching is None


def test_after_a_reboot_the_window_resumes_where_it_was_without_the_time_off(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    w = window(tmp_path, clock)
    w.start(META)
    clock.advance(20)
    assert window(tmp_path, clock).on_boot("d1") is None  # saved at 20 s of window time
    clock.reboot("boot-b", uptime_s=3)  # the new boot's clock starts near zero
    w = window(tmp_path, clock)
    assert w.on_boot("d1") is None  # 20 s elapsed, not "3 s - 1,020 s"
    clock.advance(9)
    assert not w.expired()
    clock.advance(2)
    assert w.expired()


def test_another_active_model_closes_the_window(tmp_path: Path) -> None:
    clock = FakeClock()
    window(tmp_path, clock).start(META)
    w = window(tmp_path, clock)
    assert w.on_boot("other-digest") is None
    assert w.watching is None and not (tmp_path / "health.json").exists()


def test_an_old_wall_clock_state_file_opens_no_window(tmp_path: Path) -> None:
    (tmp_path / "health.json").write_text(
        '{"digest": "d1", "model": "kws", "version": "2", "counter": 7, '
        '"switched_at": 1, "window_ns": 30000000000, "boots": []}')
    assert window(tmp_path, FakeClock()).watching is None

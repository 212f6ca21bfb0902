"""Time for the hub's deadlines: a wall clock and a monotonic clock, injectable.

The ledger records wall-clock instants (an entry's `ts`: when a wave started, when its
bake began). Those instants survive a restart; the monotonic clock does not. A hub
whose wall clock was stepped (an NTP correction, a bad RTC after a reboot) must still
end a 5 s bake about 5 s after it began, so durations are measured like this:

* within a process, elapsed time advances on the monotonic clock only: a wall clock
  stepped while the hub runs changes no deadline;
* the first time a process sees a recorded instant `ts`, it takes the elapsed time so
  far from the wall clock, `max(0, wall_now - ts)`: a wall clock that went BACKWARDS
  (now earlier than `ts`) counts as "just started", never as "starts in the future".
  So a restarted hub never waits longer than the full duration, measured from when it
  first saw the instant, whatever its wall clock says (the rule is
  `end = min(ts + duration, first_seen + duration)` on the wall clock,
  i.e. `max`-of-progress: the deadline from the ledger or the duration from now,
  whichever comes first);
* a wall clock that is AHEAD at restart makes the bake look older than it is and can
  end it early; the hub cannot tell a clock ahead from a long stop. `clock_skew` logs
  a clock that is behind the ledger's newest entry (surely wrong).

`SystemClock` is the real one; tests inject another (no libfaketime needed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Protocol

# Expiry checks tolerate this much disagreement between clocks (hub and devices).
CLOCK_SKEW_NS = 5 * 60 * 10**9


class Clock(Protocol):
    def wall_ns(self) -> int: ...

    def monotonic_ns(self) -> int: ...


class SystemClock:
    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


class OffsetClock:
    """The system clock with the wall clock moved by `offset_ns` (tests: a hub whose
    clock is 2 h behind)."""

    def __init__(self, offset_ns: int) -> None:
        self.offset_ns = offset_ns

    def wall_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


class Stopwatch:
    """Elapsed time since recorded wall-clock instants, by the rules of the module
    docstring. `key` names what the instant is (e.g. (rollout, wave, "bake")), so
    instants of finished things can be forgotten."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._seen: dict[Hashable, tuple[int, int, int]] = {}  # key -> (ts, mono, elapsed)

    def elapsed_ns(self, key: Hashable, ts: int) -> int:
        seen = self._seen.get(key)
        mono = self.clock.monotonic_ns()
        if seen is None or seen[0] != ts:
            seen = (ts, mono, max(0, self.clock.wall_ns() - ts))
            self._seen[key] = seen
        return seen[2] + (mono - seen[1])

    def as_of_now(self, key: Hashable, ts: int, now_ns: int) -> int:
        """`ts` moved onto this process's timeline: the instant that lies the elapsed
        time before `now_ns`."""
        return now_ns - self.elapsed_ns(key, ts)

    def forget(self, keep: Callable[[Hashable], bool]) -> None:
        """Drop the instants whose key `keep` rejects (finished rollouts)."""
        for key in [k for k in self._seen if not keep(k)]:
            del self._seen[key]


def clock_skew(wall_ns: int, newest_recorded_ns: int | None) -> int:
    """How far the wall clock is behind the newest recorded instant (0: not behind,
    or within CLOCK_SKEW_NS)."""
    if newest_recorded_ns is None:
        return 0
    behind = newest_recorded_ns - wall_ns
    return behind if behind > CLOCK_SKEW_NS else 0

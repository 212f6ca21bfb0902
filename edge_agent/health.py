"""The health window after a model switch, and the evidence for an automatic revert.

After the agent switches to a new model it watches it for `window_seconds`:

- an inference error rate above `max_error_rate` (over at least `min_samples`
  inferences in this window),
- a crash loop: the agent starting `max_restarts` times inside the window with the
  new model still active,

are each a reason to revert to the previous slot (a model that fails to load at all
is one too; the agent handles that at start). The window's state lives in
`health.json`, written atomically, so restarts are counted across processes:

    {"digest", "model", "version", "counter", "window_ns",
     "boot_id", "base_ns", "elapsed_ns", "boots": [elapsed ns]}

Time is the window's own elapsed run time, never the wall clock: a wall clock stepped
by NTP or a dead RTC battery (hours, either way) would otherwise close a window at once
or keep it open for good. Within one OS boot the elapsed time is CLOCK_BOOTTIME (it
survives the agent's restarts, counts suspend, and is never stepped) minus `base_ns`;
after a reboot (another `boot_id`) the window resumes from the elapsed time it had
reached when last saved, so time with the device off does not count. Every moment the
window records (its start, each boot) is stored as elapsed window time.
`HealthWindow` decides; the agent does the revert.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ledger.durable import atomic_write

log = logging.getLogger("edge_agent.health")

HEALTH_NAME = "health.json"
MAX_RESTARTS = 3
MIN_SAMPLES = 20


BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class RunTime:
    """One reading of the clock the window runs on: which OS boot, and the ns since it."""

    boot_id: str
    ns: int


def run_time() -> RunTime:
    """The OS boot's id and CLOCK_BOOTTIME (monotonic where there is no such clock)."""
    try:
        boot_id = BOOT_ID_PATH.read_text().strip()
    except OSError:
        # No /proc: a clock reading below the saved base then marks a reboot (rebase).
        boot_id = "unknown"
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return RunTime(boot_id or "unknown", time.clock_gettime_ns(clock))


@dataclass
class _WindowState:
    digest: str
    model: str
    version: str
    counter: int
    window_ns: int
    boot_id: str  # the OS boot `base_ns` belongs to
    base_ns: int  # CLOCK_BOOTTIME at which `elapsed_ns` was reached in this boot
    elapsed_ns: int  # window time reached at base_ns
    boots: list[int] = field(default_factory=list)  # elapsed window time of each start

    def elapsed(self, now: RunTime) -> int:
        """Window time at `now`; a reading from another boot resumes from `elapsed_ns`."""
        if now.boot_id != self.boot_id or now.ns < self.base_ns:
            return self.elapsed_ns
        return self.elapsed_ns + (now.ns - self.base_ns)

    def rebase(self, now: RunTime) -> None:
        """Carry the window over to `now`'s boot (no-op within the same boot)."""
        if now.boot_id != self.boot_id or now.ns < self.base_ns:
            self.boot_id, self.base_ns = now.boot_id, now.ns


class HealthWindow:
    def __init__(
        self,
        state_dir: Path,
        window_seconds: float,
        max_error_rate: float,
        max_restarts: int = MAX_RESTARTS,
        min_samples: int = MIN_SAMPLES,
        clock: Callable[[], RunTime] = run_time,
    ) -> None:
        self.path = state_dir / HEALTH_NAME
        self.window_ns = int(window_seconds * 1e9)
        self.max_error_rate = max_error_rate
        self.max_restarts = max_restarts
        self.min_samples = min_samples
        self.clock = clock
        self._state = self._load()
        self.count = 0
        self.errors = 0

    @property
    def watching(self) -> _WindowState | None:
        return self._state

    def start(self, meta: dict[str, Any]) -> None:
        """A new model was just switched in: open its window."""
        if self.window_ns <= 0:
            self.clear()
            return
        now = self.clock()
        self._state = _WindowState(
            digest=str(meta.get("digest", "")), model=str(meta.get("model", "")),
            version=str(meta.get("version", "")), counter=int(meta.get("counter", 0)),
            window_ns=self.window_ns, boot_id=now.boot_id, base_ns=now.ns, elapsed_ns=0,
        )
        self.count = self.errors = 0
        self._save()

    def clear(self) -> None:
        self._state = None
        self.count = self.errors = 0
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def on_boot(self, active_digest: str | None) -> str | None:
        """Count this start; return crash-loop evidence if it is one start too many."""
        state = self._state
        if state is None:
            return None
        now = self.clock()
        elapsed = state.elapsed(now)
        if active_digest != state.digest or elapsed > state.window_ns:
            self.clear()  # another model runs, or the window passed while we were down
            return None
        state.elapsed_ns = elapsed
        state.base_ns, state.boot_id = now.ns, now.boot_id
        state.boots = [t for t in state.boots if elapsed - t <= state.window_ns] + [elapsed]
        self._save()
        if len(state.boots) >= self.max_restarts:
            return (f"crash loop: {len(state.boots)} restarts in {elapsed / 1e9:.1f} s "
                    f"with {state.model}/{state.version} active")
        return None

    def record(self, ok: bool) -> str | None:
        """Count one inference; return error-rate evidence once it is over the limit."""
        if self._state is None:
            return None
        self.count += 1
        self.errors += 0 if ok else 1
        if self.count >= self.min_samples and self.errors / self.count > self.max_error_rate:
            return (f"error rate {self.errors / self.count:.2f} above {self.max_error_rate:.2f}: "
                    f"{self.errors} of {self.count} inferences failed in the health window "
                    f"of {self._state.model}/{self._state.version}")
        return None

    def expired(self) -> bool:
        """True once the window has passed (the model is then considered healthy)."""
        state = self._state
        if state is None:
            return False
        now = self.clock()
        if now.boot_id != state.boot_id:
            # Rebooted without passing on_boot (it always runs first in the agent):
            # resume from the saved elapsed time rather than compare two boots' clocks.
            state.rebase(now)
            self._save()
        return state.elapsed(now) > state.window_ns

    def _save(self) -> None:
        assert self._state is not None
        atomic_write(self.path, json.dumps(asdict(self._state)).encode())

    def _load(self) -> _WindowState | None:
        try:
            return _WindowState(**json.loads(self.path.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError) as exc:
            # An older agent's file (wall-clock times) is also refused here: no window
            # is better than one measured on a clock that may have been stepped.
            log.warning("health state %s unreadable (%s); no window open", self.path, exc)
            return None

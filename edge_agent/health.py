"""The health window after a model switch, and the evidence for an automatic revert.

After the agent switches to a new model it watches it for `window_seconds`:

- an inference error rate above `max_error_rate` (over at least `min_samples`
  inferences in this window),
- a crash loop: the agent starting `max_restarts` times inside the window with the
  new model still active,

are each a reason to revert to the previous slot (a model that fails to load at all
is one too; the agent handles that at start). The window's state lives in
`health.json`, written atomically, so restarts are counted across processes:

    {"digest", "model", "version", "counter", "switched_at" (ns), "window_ns", "boots": [ns]}

Times are wall-clock nanoseconds (monotonic clocks do not survive a restart).
`HealthWindow` decides; the agent does the revert.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ledger.durable import atomic_write

log = logging.getLogger("edge_agent.health")

HEALTH_NAME = "health.json"
MAX_RESTARTS = 3
MIN_SAMPLES = 20


@dataclass
class _WindowState:
    digest: str
    model: str
    version: str
    counter: int
    switched_at: int
    window_ns: int
    boots: list[int] = field(default_factory=list)


class HealthWindow:
    def __init__(
        self,
        state_dir: Path,
        window_seconds: float,
        max_error_rate: float,
        max_restarts: int = MAX_RESTARTS,
        min_samples: int = MIN_SAMPLES,
    ) -> None:
        self.path = state_dir / HEALTH_NAME
        self.window_ns = int(window_seconds * 1e9)
        self.max_error_rate = max_error_rate
        self.max_restarts = max_restarts
        self.min_samples = min_samples
        self._state = self._load()
        self.count = 0
        self.errors = 0

    @property
    def watching(self) -> _WindowState | None:
        return self._state

    def start(self, meta: dict[str, Any], now: int | None = None) -> None:
        """A new model was just switched in: open its window."""
        if self.window_ns <= 0:
            self.clear()
            return
        self._state = _WindowState(
            digest=str(meta.get("digest", "")), model=str(meta.get("model", "")),
            version=str(meta.get("version", "")), counter=int(meta.get("counter", 0)),
            switched_at=time.time_ns() if now is None else now, window_ns=self.window_ns,
        )
        self.count = self.errors = 0
        self._save()

    def clear(self) -> None:
        self._state = None
        self.count = self.errors = 0
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def on_boot(self, active_digest: str | None, now: int | None = None) -> str | None:
        """Count this start; return crash-loop evidence if it is one start too many."""
        state = self._state
        if state is None:
            return None
        now = time.time_ns() if now is None else now
        if active_digest != state.digest or now - state.switched_at > state.window_ns:
            self.clear()  # another model runs, or the window passed while we were down
            return None
        state.boots = [t for t in state.boots if now - t <= state.window_ns] + [now]
        self._save()
        if len(state.boots) >= self.max_restarts:
            span = (now - state.switched_at) / 1e9
            return (f"crash loop: {len(state.boots)} restarts in {span:.1f} s "
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

    def expired(self, now: int | None = None) -> bool:
        """True once the window has passed (the model is then considered healthy)."""
        state = self._state
        if state is None:
            return False
        now = time.time_ns() if now is None else now
        return now - state.switched_at > state.window_ns

    def _save(self) -> None:
        assert self._state is not None
        atomic_write(self.path, json.dumps(asdict(self._state)).encode())

    def _load(self) -> _WindowState | None:
        try:
            return _WindowState(**json.loads(self.path.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError) as exc:
            log.warning("health state %s unreadable (%s); no window open", self.path, exc)
            return None

"""Inference counters over one fixed window (pure)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

# Keep at most this many latency samples per window; beyond it we sample evenly
# enough for percentiles without growing memory with the inference rate.
MAX_SAMPLES = 4096


class TelemetryWindowBuilder:
    def __init__(self) -> None:
        self._reset(time.time_ns())

    def _reset(self, start: int) -> None:
        self.start = start
        self.count = 0
        self.errors = 0
        self._latencies: list[float] = []

    def record(self, latency_ms: float, ok: bool) -> None:
        self.count += 1
        if not ok:
            self.errors += 1
        if len(self._latencies) < MAX_SAMPLES:
            self._latencies.append(latency_ms)
        else:
            self._latencies[self.count % MAX_SAMPLES] = latency_ms

    def take(self) -> dict[str, Any] | None:
        """Close the window and return its summary, or None if nothing ran in it."""
        end = time.time_ns()
        if self.count == 0:
            self._reset(end)
            return None
        lat = np.asarray(self._latencies, dtype=np.float64)
        summary = {
            "start": self.start,
            "end": end,
            "count": self.count,
            "errors": self.errors,
            "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p95": float(np.percentile(lat, 95)),
            "latency_ms_max": float(lat.max()),
        }
        self._reset(end)
        return summary

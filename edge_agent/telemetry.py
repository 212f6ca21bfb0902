"""Inference counters over one fixed window (pure).

A window has the count, errors, latency percentiles, a latency histogram on the fixed
buckets of edge_agent.bins, and, once the running model's release manifest gives
reference bin edges (`drift_bins`, one list per output), a histogram per output on
exactly those edges, with the same binning rule the hub used for the reference, over the
same values: a quantized (integer) output is dequantized with its (scale, zero_point)
first (edge_agent.protocol.bins.dequantize), as the hub did.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol.bins import (
    LATENCY_BUCKETS_MS,
    bin_of,
    check_edges,
    dequantize,
    latency_bucket,
)

# Keep at most this many latency samples per window; beyond it we sample evenly
# enough for percentiles without growing memory with the inference rate.
MAX_SAMPLES = 4096


class TelemetryWindowBuilder:
    def __init__(self) -> None:
        self._edges: list[NDArray[np.float64]] = []
        self._edge_lists: list[list[float]] = []
        self._quantization: tuple[float, int] = (0.0, 0)
        self._reset(time.time_ns())

    def set_drift_bins(self, drift_bins: Sequence[Sequence[float]],
                       quantization: Sequence[float] | None = None) -> None:
        """Bin edges per output (from the manifest) of the model that runs from now on,
        and the (scale, zero_point) of its output tensor (an integer output is
        dequantized with them before binning); outputs with unusable edges get no
        histogram."""
        self._quantization = (0.0, 0)
        if quantization is not None and len(quantization) == 2:
            scale, zero_point = float(quantization[0]), int(quantization[1])
            if np.isfinite(scale) and scale > 0:
                self._quantization = (scale, zero_point)
        edges = []
        for e in drift_bins:
            try:
                edges.append(check_edges(e))
            except ValueError:
                break  # keep output indexes aligned: stop at the first bad one
        self._edges = edges
        self._edge_lists = [[float(v) for v in e] for e in edges]  # for bins.bin_of
        self._hist = [[0] * (e.size - 1) for e in self._edges]

    def _reset(self, start: int) -> None:
        self.start = start
        self.count = 0
        self.errors = 0
        self._latencies: list[float] = []
        self._buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._hist = [[0] * (e.size - 1) for e in self._edges]

    def record(self, latency_ms: float, ok: bool, output: NDArray[Any] | None = None) -> None:
        self.count += 1
        if not ok:
            self.errors += 1
        self._buckets[latency_bucket(latency_ms)] += 1
        if len(self._latencies) < MAX_SAMPLES:
            self._latencies.append(latency_ms)
        else:
            self._latencies[self.count % MAX_SAMPLES] = latency_ms
        if output is not None and ok and self._edges:
            # Output k of a [1, n] (or [n]) tensor goes into histogram k, as a real
            # value: integers dequantized (bins.dequantize; floats pass as they are).
            flat = dequantize(output, *self._quantization).tolist()
            for k, edges in enumerate(self._edge_lists[: len(flat)]):
                self._hist[k][bin_of(flat[k], edges)] += 1

    def take(self) -> dict[str, Any] | None:
        """Close the window and return its summary, or None if nothing ran in it."""
        end = time.time_ns()
        if self.count == 0:
            self._reset(end)
            return None
        lat = sorted(self._latencies)
        summary = {
            "start": self.start,
            "end": end,
            "count": self.count,
            "errors": self.errors,
            "latency_ms_p50": percentile(lat, 50),
            "latency_ms_p95": percentile(lat, 95),
            "latency_ms_max": lat[-1],
            "latency_buckets": list(self._buckets),
            "output_hist": [list(h) for h in self._hist],
        }
        self._reset(end)
        return summary


def percentile(ordered: Sequence[float], q: float) -> float:
    """numpy.percentile(values, q) by its default (linear) method, equal to it within
    float rounding (1e-14 relative), of sorted, non-empty values: a window has a
    handful of samples, and numpy's overhead for so few was most of what closing a
    window cost (profile of 500 simulated agents)."""
    n = len(ordered)
    fraction = q / 100.0
    virtual = n * fraction + (1.0 + fraction * -1.0) - 1.0  # numpy's alpha = beta = 1
    below = max(0, min(int(virtual // 1), n - 1))
    above = min(below + 1, n - 1)
    gamma = virtual - (virtual // 1)
    a, b = float(ordered[below]), float(ordered[above])
    diff = b - a
    return b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma

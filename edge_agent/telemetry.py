"""Inference counters over one fixed window (pure).

A window has the count, errors, latency percentiles, a latency histogram on the fixed
buckets of edge_agent.bins, and, once the running model's release manifest gives
reference bin edges (`drift_bins`, one list per watched output value: the first values
of each output tensor, `drift_tensors` saying how many of each), a histogram per watched
value on exactly those edges, with the same binning rule the hub used for the reference,
over the same values: a quantized (integer) output is dequantized with its tensor's
(scale, zero_point) first (edge_agent.protocol.bins.dequantize), as the hub did.
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


# Calls whose outputs are held before they are binned together (BatchBinner).
BIN_BATCH = 256


class BatchBinner:
    """Histograms of K values per call, each on its own edges, by bins.bin_of's rule,
    binned in batches: a call only copies its K values into a buffer, and every
    BIN_BATCH calls (or when the counts are read) numpy bins them all at once. Binning
    each value as it came (bin_of) cost ~0.5 us a value, 40 us a call for 64 outputs,
    on the event loop that also serves the agent's NATS work."""

    def __init__(self, edges: Sequence[NDArray[np.float64]]) -> None:
        self.width = len(edges)
        widest = max((e.size for e in edges), default=2)
        # Shorter edge lists padded with +inf: a finite value is below the padding, so
        # it counts only the row's own edges; +inf and NaN count the padding too and
        # are capped into the row's last bin below, as bin_of puts them.
        self._edges = np.full((self.width, widest), np.inf)
        for k, e in enumerate(edges):
            self._edges[k, : e.size] = e
        self._last = np.asarray([e.size - 2 for e in edges], dtype=np.intp)
        self._sizes = [e.size - 1 for e in edges]
        self._offsets = np.arange(self.width, dtype=np.intp) * (widest - 1)
        self._counts = np.zeros(self.width * (widest - 1), dtype=np.int64)
        self._buffer = np.empty((BIN_BATCH, self.width), dtype=np.float64)
        self._held = 0

    def add(self, values: NDArray[np.float64]) -> None:
        """One call's K values (value k on edges k)."""
        self._buffer[self._held] = values
        self._held += 1
        if self._held == BIN_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._held:
            return
        held = self._buffer[: self._held]
        # bisect_right(edges, v) is the count of edges <= v; `not v < e` also holds for
        # NaN, which so passes every edge and lands in the last bin, as with bin_of.
        passed = np.logical_not(held[:, :, None] < self._edges[None, :, :]).sum(axis=2)
        index = np.minimum(np.maximum(passed - 1, 0), self._last)
        self._counts += np.bincount((index + self._offsets).ravel(),
                                    minlength=self._counts.size)
        self._held = 0

    def counts(self) -> list[list[int]]:
        self._flush()
        rows = self._counts.reshape(self.width, -1).tolist()
        return [row[:size] for row, size in zip(rows, self._sizes, strict=True)]

    def reset(self) -> None:
        self._counts[:] = 0
        self._held = 0


class TelemetryWindowBuilder:
    def __init__(self) -> None:
        self._edges: list[NDArray[np.float64]] = []
        self._edge_lists: list[list[float]] = []
        self._layout: list[int] = []
        self._quantizations: list[tuple[float, int]] = []
        self._binner: BatchBinner | None = None
        self._reset(time.time_ns())

    def set_drift_bins(self, drift_bins: Sequence[Sequence[float]],
                       quantization: Sequence[float] | None = None,
                       tensors: Sequence[int] | None = None,
                       tensor_quantization: Sequence[Sequence[float] | None] | None = None,
                       ) -> None:
        """Bin edges per watched output value (from the manifest) of the model that runs
        from now on. `tensors`: how many of them each output tensor has, in order (the
        manifest's drift_tensors; None: all of the first tensor). An integer output is
        dequantized before binning with its tensor's (scale, zero_point):
        `tensor_quantization[t]`, else `quantization` for the first tensor. Outputs with
        unusable edges get no histogram."""
        edges = []
        for e in drift_bins:
            try:
                edges.append(check_edges(e))
            except ValueError:
                break  # keep output indexes aligned: stop at the first bad one
        layout = [len(drift_bins)] if tensors is None else [int(n) for n in tensors]
        kept, self._layout = len(edges), []
        for n in layout:  # the tensors' counts, cut where the usable edges end
            self._layout.append(max(0, min(n, kept)))
            kept -= self._layout[-1]
        per_tensor = list(tensor_quantization or [quantization])
        self._quantizations = [
            _usable_quantization(per_tensor[t] if t < len(per_tensor) else None)
            for t in range(len(self._layout))]
        self._edges = edges
        self._edge_lists = [[float(v) for v in e] for e in edges]  # for bins.bin_of
        self._hist = [[0] * (e.size - 1) for e in self._edges]
        self._binner = BatchBinner(edges) if edges else None

    def _reset(self, start: int) -> None:
        self.start = start
        self.count = 0
        self.errors = 0
        self._latencies: list[float] = []
        self._buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._hist = [[0] * (e.size - 1) for e in self._edges]
        if self._binner is not None:
            self._binner.reset()

    def record(self, latency_ms: float, ok: bool,
               output: NDArray[Any] | Sequence[NDArray[Any]] | None = None) -> None:
        """Count one inference; `output`: its output tensors in order (one array: the
        first tensor only)."""
        self.count += 1
        if not ok:
            self.errors += 1
        self._buckets[latency_bucket(latency_ms)] += 1
        if len(self._latencies) < MAX_SAMPLES:
            self._latencies.append(latency_ms)
        else:
            self._latencies[self.count % MAX_SAMPLES] = latency_ms
        if output is None or not ok or not self._edges:
            return
        outputs = [output] if isinstance(output, np.ndarray) else list(output)
        # The first N values of each output tensor ([1, n] or [n] or any shape, in C
        # order), as real values: integers dequantized with their tensor's parameters
        # (bins.dequantize; floats pass as they are); histogram k is value k of them all.
        parts = []
        for t, n in enumerate(self._layout):
            if n == 0:
                continue
            if t >= len(outputs):
                break
            head = np.asarray(outputs[t]).ravel()[:n]
            parts.append(dequantize(head, *self._quantizations[t]))
            if head.size < n:
                break  # later values would land in the wrong histograms
        values = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else None
        if values is None:
            return
        if self._binner is not None and values.size == self._binner.width:
            self._binner.add(values)
            return
        # Fewer values than the manifest has edges for (not a model the hub released,
        # or the synthetic load's first output only): the ones there, one by one.
        for k, value in enumerate(values.tolist()):
            self._hist[k][bin_of(value, self._edge_lists[k])] += 1

    def _histograms(self) -> list[list[int]]:
        if self._binner is None:
            return [list(h) for h in self._hist]
        return [[a + b for a, b in zip(batched, single, strict=True)]
                for batched, single in zip(self._binner.counts(), self._hist, strict=True)]

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
            "output_hist": self._histograms(),
        }
        self._reset(end)
        return summary


def _usable_quantization(q: Sequence[float] | None) -> tuple[float, int]:
    """(scale, zero_point) when `q` is a usable pair (positive finite scale), else
    (0.0, 0): the values are binned as they are."""
    if q is not None and len(q) == 2:
        scale, zero_point = float(q[0]), int(q[1])
        if np.isfinite(scale) and scale > 0:
            return scale, zero_point
    return 0.0, 0


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

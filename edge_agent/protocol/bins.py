"""The binning rule devices and the hub share (pure, numpy only).

Reference histograms (hub.validation) and device output histograms (edge_agent.telemetry)
must put every value into the same bin, or the drift score (PSI) measures the rule, not
the model. So there is exactly one rule, here:

    bin i holds edges[i] <= v < edges[i+1]; values below the first edge count in the
    first bin, values at or above the last edge (and +inf) in the last bin; NaN counts
    in the last bin too (numpy's searchsorted sorts it after +inf).

Edges must be at least two strictly increasing finite numbers.

The values binned are the model's REAL outputs: an integer (quantized) output tensor is
first dequantized with its (scale, zero_point), as `dequantize` does, on both sides (the
hub when it builds the reference, the device before it counts). The manifest carries
each tensor's quantization so a device needs nothing else to apply the same rule.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol.documents import LATENCY_BUCKET_COUNT


def check_edges(edges: Sequence[float] | NDArray[Any]) -> NDArray[np.float64]:
    """The edges as a float64 array; ValueError unless strictly increasing and finite."""
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise ValueError("edges must be at least two strictly increasing finite numbers")
    return e


def bin_index(values: Any, edges: NDArray[np.float64]) -> NDArray[np.intp]:
    """The bin of every value (flattened), for checked `edges`."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return np.clip(np.searchsorted(edges, v, side="right") - 1, 0, edges.size - 2)


def bin_of(value: float, edges: Sequence[float]) -> int:
    """The bin of one value, by exactly bin_index's rule, without numpy's per-call cost
    (a device bins every output of every inference). `edges` as checked, in a list:
    bisect_right is searchsorted(side="right"); NaN compares false with every edge,
    so it lands past the last one, into the last bin, as with searchsorted."""
    return min(max(bisect_right(edges, value) - 1, 0), len(edges) - 2)


def is_quantized(dtype: Any, scale: float) -> bool:
    """Whether a tensor of `dtype` with this scale holds quantized integers: an integer
    dtype and a positive scale (TFLite writes scale 0.0 for a tensor that is not)."""
    return np.dtype(dtype).kind in "iu" and scale > 0


def dequantize(values: Any, scale: float, zero_point: int) -> NDArray[np.float64]:
    """The real values of a tensor's raw `values`, flattened, as float64:
    (q - zero_point) * scale for an integer tensor with a positive scale; any other
    tensor (float, or integer without quantization) is only converted to float64."""
    raw = np.asarray(values)
    out = raw.astype(np.float64).ravel()
    if is_quantized(raw.dtype, scale):
        out = (out - float(zero_point)) * float(scale)
    return out


def histogram_counts(values: Any, edges: Sequence[float] | NDArray[Any]) -> list[int]:
    """Counts of `values` in the bins given by `edges` (len(edges) - 1 counts)."""
    e = check_edges(edges)
    return [int(c) for c in np.bincount(bin_index(values, e), minlength=e.size - 1)]


# Upper bounds (ms) of the latency histogram in telemetry windows; a last, open bucket
# (+inf) follows, so a window has len(LATENCY_BUCKETS_MS) + 1 latency counts.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
)


if len(LATENCY_BUCKETS_MS) + 1 != LATENCY_BUCKET_COUNT:  # the decoders' bound
    raise ImportError("LATENCY_BUCKETS_MS and documents.LATENCY_BUCKET_COUNT disagree")


def latency_bucket(latency_ms: float) -> int:
    """Index of the first bucket whose upper bound is >= latency_ms (last: +inf)."""
    for i, bound in enumerate(LATENCY_BUCKETS_MS):
        if latency_ms <= bound:
            return i
    return len(LATENCY_BUCKETS_MS)


def quantile_from_buckets(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) of a latency histogram, interpolated inside its bucket;
    the open last bucket answers with its lower bound. None for an empty histogram."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            # Counts past the open last bucket (never sent since decoders check the
            # length; aggregates stored before that) count as the open bucket.
            low = LATENCY_BUCKETS_MS[min(i, len(LATENCY_BUCKETS_MS)) - 1] if i > 0 else 0.0
            if i >= len(LATENCY_BUCKETS_MS):
                return low
            return low + (LATENCY_BUCKETS_MS[i] - low) * (rank - seen) / c
        seen += c
    return LATENCY_BUCKETS_MS[-1]

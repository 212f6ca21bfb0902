"""Output drift, pure: the reference histograms a validation run records (their bin
edges go into the release manifest, so devices count their outputs in the same bins)
and the population stability index (PSI) of a device's counts against them.

The validation gate makes the reference histograms; telemetry ingest judges drift. Both
import this module, so telemetry does not load the validation gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol import bins

MIN_PER_BIN = 20  # PSI is judged once an output has this many samples per reference bin


@dataclass(frozen=True)
class ReferenceHistogram:
    """Output `output_index` of the validation run: bin edges (strictly increasing)
    and the count of validation outputs in each bin (see `histogram_counts`).
    `degenerate`: every validation output had the same value, so the reference has one
    populated bin and PSI can only tell whether outputs left that value (flagged)."""

    output_index: int
    edges: list[float]
    counts: list[int]
    degenerate: bool = False
    # The output tensor the value is of (0: the first). `output_index` counts across
    # tensors, as devices' output histograms do: tensor 0's watched values first, then
    # tensor 1's, and so on (the manifest's `drift_tensors` says how many of each).
    tensor: int = 0

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output_index": self.output_index, "edges": self.edges,
                               "counts": self.counts}
        if self.degenerate:
            out["degenerate"] = True
        if self.tensor:  # absent for the first tensor: entries from before it read alike
            out["tensor"] = self.tensor
        return out


def histogram_counts(values: NDArray[Any], edges: list[float]) -> list[int]:
    """Counts of `values` in the bins given by `edges` (the rule devices must share).

    Bin i holds edges[i] <= v < edges[i+1]; values below the first edge count in the
    first bin and values at or above the last edge in the last bin, so every value is
    counted exactly once. The rule lives in edge_agent.bins, which devices import too.
    """
    return bins.histogram_counts(values, edges)


# Width of the bins around a reference without spread: relative to the value, at least
# this absolute width (a constant output of 0 still gets bins of a usable width).
MIN_BIN_WIDTH = 1e-6
_RELATIVE_PAD = 1e-3


def _pad(span: float, at: float) -> float:
    return span * _RELATIVE_PAD if span > 0 else max(abs(at) * _RELATIVE_PAD, MIN_BIN_WIDTH)


def quantile_edges(values: NDArray[np.float64], n_bins: int) -> list[float]:
    """Bin edges for the reference histogram of `values` (finite, at least one).

    The edges are the 0, 1/n, ..., 1 quantiles of `values`, the outer two widened by
    1e-3 of the range. Where quantiles tie (a value holding at least 1/n of the mass,
    e.g. a detector that outputs 0 on most rows, or a quantized output), the tied value
    is isolated in a bin of its own: an edge at the value itself and one halfway to the
    next observed value above it (below it, for the largest value), so any two distinct
    values give at least two populated bins and a mass point cannot hide the rest of the
    distribution. The other values share the n - (tied values) bins left, at their own
    inner quantiles; a bin all this leaves empty is merged into the one below it.
    Without ties the edges are the plain quantiles, exactly as before.

    Values with no spread at all (every value the same, v) get the edges
    v - w, v, v + w, v + 2w with w = max(1e-3 |v|, MIN_BIN_WIDTH): below / at / above v;
    `is_degenerate` says so, and validation flags that output.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("reference values must be finite, at least one")
    quantiles = np.quantile(v, np.linspace(0.0, 1.0, n_bins + 1))
    edges = np.unique(quantiles)
    low, high = float(v[0]), float(v[-1])
    if low == high:  # no spread: below, at and above the one value
        w = _pad(0.0, low)
        return [low - w, low, low + w, low + 2 * w]
    pad = _pad(high - low, low)
    if edges.size == n_bins + 1:  # no ties: the plain quantile edges
        edges[0] -= pad
        edges[-1] += pad
        return [float(x) for x in edges]
    distinct = np.unique(v)
    values_, counts = np.unique(quantiles, return_counts=True)
    out = {low, high}
    tied = [float(x) for x, c in zip(values_, counts, strict=True) if c > 1]
    for t in tied:
        i = int(np.searchsorted(distinct, t))  # distinct[i] == t (a tie is a data value)
        if i > 0:  # values below t: an edge at t keeps them out of t's bin
            out.add(t)
        if i + 1 < distinct.size:  # values above t: an edge between t and the next one
            above = float(distinct[i + 1])
            mid = (t + above) / 2
            out.add(mid if t < mid < above else above)
        elif i > 0:  # t is the largest value: an edge between it and the one below
            below = float(distinct[i - 1])
            mid = (below + t) / 2
            out.add(mid if below < mid < t else t)
    # The values besides the tied ones get the bins the ties left, at their own quantiles.
    rest = v[~np.isin(v, tied)]
    if rest.size:
        share = np.linspace(0.0, 1.0, max(n_bins - len(tied), 1) + 1)
        out.update(float(x) for x in np.quantile(rest, share[1:-1]))
    merged = np.array(sorted(out))
    merged[0] = min(merged[0], low) - pad
    merged[-1] = max(merged[-1], high) + pad
    merged = bins.check_edges(np.unique(merged))
    # A bin no value fell in (an edge halfway to a neighbour beside a quantile edge):
    # merge it into the bin below, which moves no value to another bin.
    counts = np.bincount(bins.bin_index(v, merged), minlength=merged.size - 1)
    keep = [0, *(i for i in range(1, merged.size - 1) if counts[i] > 0), merged.size - 1]
    return [float(merged[i]) for i in keep]


def is_degenerate(values: NDArray[Any]) -> bool:
    """Whether `values` have no spread at all (every one the same)."""
    v = np.asarray(values, dtype=np.float64)
    return bool(v.size == 0 or np.all(v == v.flat[0]))


def reference_histogram(output_index: int, values: NDArray[Any],
                        n_bins: int, tensor: int = 0) -> ReferenceHistogram:
    """The reference histogram of one output's validation values (`quantile_edges`)."""
    edges = quantile_edges(values, n_bins)
    return ReferenceHistogram(output_index, edges, histogram_counts(values, edges),
                              degenerate=is_degenerate(values), tensor=tensor)


def blind_outputs(reference: list[dict[str, Any]]) -> list[int]:
    """The outputs whose reference histogram (validation payload) is flagged degenerate."""
    return [int(h.get("output_index", k)) for k, h in enumerate(reference)
            if isinstance(h, dict) and h.get("degenerate") is True]


MAX_NAMED_OUTPUTS = 16  # outputs a warning names one by one


def drift_blind_warning(outputs: list[int]) -> str:
    """The sentence that flags degenerate references ("" when there are none)."""
    if not outputs:
        return ""
    which = ", ".join(str(k) for k in outputs[:MAX_NAMED_OUTPUTS])
    if len(outputs) > MAX_NAMED_OUTPUTS:  # a sentence, not a list of thousands
        which += f" and {len(outputs) - MAX_NAMED_OUTPUTS:,} more"
    return (f"drift reference of output(s) {which} has no spread: every validation output "
            "had the same value, so PSI can only tell whether outputs left that value; "
            "validate with data on which the output varies for a drift gate that sees")


def psi(reference_counts: list[int], observed_counts: list[int], eps: float = 1e-4) -> float:
    """Population stability index of observed against reference bin counts.

        PSI = sum_i (o_i - r_i) * ln(o_i / r_i)

    where r_i and o_i are the shares of the reference and observed counts in bin i,
    each floored at `eps` so empty bins stay finite. PSI is 0 for identical shares and
    grows as the distributions move apart; a common reading is < 0.1 stable,
    0.1-0.25 moderate shift, > 0.25 major shift.
    """
    ref = np.asarray(reference_counts, dtype=np.float64)
    obs = np.asarray(observed_counts, dtype=np.float64)
    if ref.ndim != 1 or ref.shape != obs.shape or ref.size == 0:
        raise ValueError(
            f"reference and observed counts must be lists of the same length, "
            f"got {ref.size} and {obs.size}"
        )
    if np.any(ref < 0) or np.any(obs < 0) or ref.sum() <= 0 or obs.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive total")
    r = np.maximum(ref / ref.sum(), eps)
    o = np.maximum(obs / obs.sum(), eps)
    return float(np.sum((o - r) * np.log(o / r)))


def psi_per_output(reference: list[dict[str, Any]], observed: list[list[int]]) -> list[float]:
    """PSI of each output's observed bin counts against the reference histogram; outputs
    with fewer than MIN_PER_BIN samples per bin, or mismatched bins, are left out."""
    out: list[float] = []
    for k, ref in enumerate(reference):
        counts = ref.get("counts") if isinstance(ref, dict) else None
        if k >= len(observed) or not isinstance(counts, list):
            continue
        obs = observed[k]
        if len(obs) != len(counts) or sum(obs) < MIN_PER_BIN * len(counts) or sum(counts) <= 0:
            continue  # too few samples: PSI of a handful of values is mostly noise
        out.append(float(psi(counts, obs)))
    return out

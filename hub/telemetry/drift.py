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
    and the count of validation outputs in each bin (see `histogram_counts`)."""

    output_index: int
    edges: list[float]
    counts: list[int]

    def to_payload(self) -> dict[str, Any]:
        return {"output_index": self.output_index, "edges": self.edges, "counts": self.counts}


def histogram_counts(values: NDArray[Any], edges: list[float]) -> list[int]:
    """Counts of `values` in the bins given by `edges` (the rule devices must share).

    Bin i holds edges[i] <= v < edges[i+1]; values below the first edge count in the
    first bin and values at or above the last edge in the last bin, so every value is
    counted exactly once. The rule lives in edge_agent.bins, which devices import too.
    """
    return bins.histogram_counts(values, edges)


def quantile_edges(values: NDArray[np.float64], n_bins: int) -> list[float]:
    """Edges at the quantiles of `values`; tied quantiles merge, so there may be fewer
    than `n_bins` bins (e.g. quantized outputs); the outer edges are widened slightly."""
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)))
    span = float(edges[-1] - edges[0])
    pad = span * 1e-3 if span > 0 else max(abs(float(edges[0])) * 1e-3, 1e-6)
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    edges[0] -= pad
    edges[-1] += pad
    return [float(x) for x in edges]


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

"""Re-basing a release's drift reference on the output histograms its fleet reported
(the way SageMaker Model Monitor baselines on real traffic), pure.

After a baking period, the outputs devices really produced are a better reference than the
validation set's: PSI against them tells whether the fleet's traffic moved *since then*. The
bin edges stay those of the validation run (they are in the signed release manifest, and
devices count in them), so only the counts change and no new manifest is needed.

`rebase_payload` checks the observed histograms (enough inferences, the same bins as the
reference, at least two populated bins per output) and builds the `model.reference_rebased`
payload; `rebased_validation` is what the fold does with it: the release's validation
record with the new counts, so every reader of the reference (PSI in rollouts and
`rollout status`, the blind-gate check) uses them without knowing about re-basing. The
payload carries every count (the fold cannot fetch blobs, and `hub rebuild` must give the
same state); it is bounded because only a reference kept inline in `model.validated`
(at most results.INLINE_HISTOGRAM_BYTES with its edges) can be re-based.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import blake3

from ledger.encoding import canonical_encode

DEFAULT_MIN_INFERENCES = 1000
MIN_POPULATED_BINS = 2
MAX_REBASED_BYTES = 48 * 1024  # the payload without the command; counts are ints only


class RebaseRefused(ValueError):
    """The observed histograms cannot become the reference; the message says why."""


@dataclass(frozen=True)
class Observed:
    """What the fleet reported for one release, summed over the chosen assignments."""

    outputs: list[list[int]]  # per watched output value, counts per reference bin
    inferences: int
    devices: int
    assignments: int
    first_ts: int
    last_ts: int


def reference_digest(histograms: list[Any]) -> str:
    """BLAKE3 of the canonical encoding of a reference (the list of histogram maps)."""
    return blake3.blake3(canonical_encode(histograms)).hexdigest()


def rebase_payload(name: str, version: str, validation: dict[str, Any], observed: Observed,
                   source: dict[str, Any], min_inferences: int) -> dict[str, Any]:
    """The `model.reference_rebased` payload, or RebaseRefused (a one-line reason)."""
    ref = f"{name}/{version}"
    reference = validation.get("reference_histograms")
    if not isinstance(reference, list) or not reference:
        if isinstance(validation.get("detail"), dict) and validation.get(
                "reference_histograms_summary"):
            raise RebaseRefused(f"cannot re-base {ref}: its reference histograms are too large "
                                "to keep in the ledger entry (they are in the validation detail)")
        raise RebaseRefused(f"cannot re-base {ref}: it has no reference histograms to re-base")
    if observed.inferences < min_inferences:
        raise RebaseRefused(
            f"cannot re-base {ref}: the fleet reported {observed.inferences:,} inferences "
            f"from {observed.devices} device(s); at least {min_inferences:,} are needed "
            "(--min-inferences)")
    if len(observed.outputs) < len(reference):
        raise RebaseRefused(
            f"cannot re-base {ref}: devices reported histograms for {len(observed.outputs)} "
            f"output value(s), the reference has {len(reference)}")
    histograms: list[dict[str, Any]] = []
    thin: list[int] = []
    for k, h in enumerate(reference):
        edges = h.get("edges") if isinstance(h, dict) else None
        counts = observed.outputs[k]
        if not isinstance(edges, list) or len(counts) != len(edges) - 1:
            raise RebaseRefused(
                f"cannot re-base {ref}: output {k}'s reported histogram has {len(counts)} "
                f"bins, its reference has {len(edges) - 1 if isinstance(edges, list) else 0}")
        if any(not isinstance(c, int) or c < 0 for c in counts):
            raise RebaseRefused(f"cannot re-base {ref}: output {k}'s counts are malformed")
        if sum(1 for c in counts if c > 0) < MIN_POPULATED_BINS:
            thin.append(k)
        histograms.append({"output_index": int(h.get("output_index", k)), "counts": counts})
    if thin:
        which = ", ".join(str(k) for k in thin[:16]) + (
            f" and {len(thin) - 16} more" if len(thin) > 16 else "")
        raise RebaseRefused(
            f"cannot re-base {ref}: the fleet's output(s) {which} fell in fewer than "
            f"{MIN_POPULATED_BINS} bins; a reference without spread would blind the PSI gate")
    payload = {
        "name": name, "version": version,
        "histograms": histograms,
        "reference_digest": reference_digest(_with_counts(reference, histograms)),
        "previous_digest": reference_digest(reference),
        "source": {**source, "devices": observed.devices, "assignments": observed.assignments,
                   "inferences": observed.inferences, "first_ts": observed.first_ts,
                   "last_ts": observed.last_ts},
        "min_inferences": min_inferences,
    }
    size = len(canonical_encode(payload))
    if size > MAX_REBASED_BYTES:  # cannot happen for an inline reference; kept as a bound
        raise RebaseRefused(f"cannot re-base {ref}: the re-based reference is {size:,} bytes; "
                            f"the limit for the ledger entry is {MAX_REBASED_BYTES // 1024} KiB")
    return payload


def _with_counts(reference: list[dict[str, Any]], histograms: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """The reference with each histogram's counts replaced (its edges kept) and without
    the degenerate flag: a re-based reference has at least two populated bins."""
    return [{**{k: v for k, v in h.items() if k != "degenerate"}, "counts": n.get("counts")}
            for h, n in zip(reference, histograms, strict=True)]


def rebased_validation(validation: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The fold: the release's validation record with the reference counts replaced by
    the payload's (edges kept, the degenerate flag dropped: a re-based reference has
    spread) and what it was re-based on under `rebased`. A payload that does not fit the
    reference (cannot happen for one the hub wrote) leaves the record as it was."""
    reference = validation.get("reference_histograms")
    histograms = payload.get("histograms")
    if not isinstance(reference, list) or not isinstance(histograms, list) or \
            len(histograms) != len(reference):
        return validation
    if not all(isinstance(h, dict) for h in [*reference, *histograms]):
        return validation
    new = _with_counts(reference, histograms)
    return {**validation, "reference_histograms": new,
            "rebased": {"reference_digest": payload.get("reference_digest"),
                        "previous_digest": payload.get("previous_digest"),
                        "source": payload.get("source")}}

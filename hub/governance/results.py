"""Validation results of bounded size: what goes in the `model.validated` ledger entry
and what goes, in full, to the Object Store by digest.

A model with thousands of outputs or input features has thousands of reference
histograms and permutation importances. Every read of the model's row (`hub model list`,
`hub model show`) and every replay of the ledger carries the entry, so it stays small
(`MAX_VALIDATED_BYTES`) whatever the model: the large parts are summarised in the entry
(counts, the top importances) and kept whole in a *detail* document, stored as a blob
under the BLAKE3 digest of its canonical bytes. The entry names the digest and size
(`detail`), so an auditor fetches the blob and checks it against the ledger.

Pure: canonical bytes in, a payload and the detail bytes out; storing the blob is the
caller's (hub.governance.models). Outside hub.validation so that reading a
release does not import numpy and the TFLite runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import blake3

from ledger.encoding import canonical_decode, canonical_encode

MAX_VALIDATED_BYTES = 64 * 1024  # the whole model.validated payload, command excluded
INLINE_HISTOGRAM_BYTES = 32 * 1024  # reference histograms kept in the entry up to this
INLINE_IMPORTANCES = 64  # permutation importances kept in the entry up to this many
TOP_IMPORTANCES = 16  # the summary's largest importances
INLINE_METRIC_BYTES = 4 * 1024  # any other metric bigger than this goes to the detail
DETAIL_PARTS = ("reference_histograms", "metrics")  # what a detail document may hold


@dataclass(frozen=True)
class Bounded:
    """The ledger payload and, when something was moved out, the detail document."""

    payload: dict[str, Any]
    detail: bytes | None = None

    @property
    def detail_digest(self) -> str | None:
        return None if self.detail is None else blake3.blake3(self.detail).hexdigest()


def _size(value: Any) -> int:
    return len(canonical_encode(value))


def _top_importances(values: list[Any]) -> dict[str, float]:
    """The TOP_IMPORTANCES largest, as {"feature <i>": value}, largest first."""
    ranked = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return {f"feature {i}": float(values[i]) for i in ranked[:TOP_IMPORTANCES]}


def bound_payload(payload: dict[str, Any]) -> Bounded:
    """`payload` (ValidationReport.to_payload() plus the hub's fields) with its large
    parts summarised; the parts moved out go into the detail document."""
    payload = dict(payload)
    metrics = dict(payload.get("metrics", {}))
    moved_metrics: dict[str, Any] = {}
    detail: dict[str, Any] = {}

    histograms = payload.get("reference_histograms", [])
    if _size(histograms) > INLINE_HISTOGRAM_BYTES:
        detail["reference_histograms"] = histograms
        payload["reference_histograms"] = []
        payload["reference_histograms_summary"] = {
            "outputs": len(histograms),
            "degenerate": sum(1 for h in histograms if isinstance(h, dict)
                              and h.get("degenerate")),
        }

    importances = metrics.get("permutation_importance")
    if isinstance(importances, list) and len(importances) > INLINE_IMPORTANCES:
        moved_metrics["permutation_importance"] = metrics.pop("permutation_importance")
        metrics["permutation_importance_features"] = len(importances)
        metrics["permutation_importance_top"] = _top_importances(importances)

    for key in sorted(metrics):
        if _size(metrics[key]) > INLINE_METRIC_BYTES:
            moved_metrics[key] = metrics.pop(key)
    if moved_metrics:
        detail["metrics"] = moved_metrics
        metrics["in_detail"] = sorted(moved_metrics)
    payload["metrics"] = metrics

    if not detail:
        return Bounded(payload)
    data = canonical_encode(detail)
    bounded = Bounded(payload, data)
    payload["detail"] = {"digest": bounded.detail_digest, "size": len(data),
                         "parts": sorted(detail)}
    return bounded


def payload_too_big(payload: dict[str, Any]) -> str:
    """The refusal for a payload still over MAX_VALIDATED_BYTES ("" if it fits)."""
    size = _size(payload)
    if size <= MAX_VALIDATED_BYTES:
        return ""
    biggest = max(payload, key=lambda k: _size(payload[k]))
    return (f"validation results are {size:,} bytes even summarised ({biggest!r} is the "
            f"largest part); the limit for the ledger entry is {MAX_VALIDATED_BYTES // 1024} "
            "KiB")


def read_detail(data: bytes) -> dict[str, Any]:
    """A detail document back from its bytes (checked against its digest by the caller)."""
    doc = canonical_decode(data)
    if not isinstance(doc, dict) or set(doc) - set(DETAIL_PARTS):
        raise ValueError("not a validation detail document")
    return doc

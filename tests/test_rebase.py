"""Re-basing the drift reference on fleet traffic, pure: the rule that refuses too little
or malformed traffic, the payload, and the fold (hub/governance/rebase.py). The run on a
real hub and agent is in tests/test_drift.py."""

from __future__ import annotations

from typing import Any

import pytest

from hub.commands.envelope import VERB_ROLES
from hub.governance.rebase import (
    Observed,
    RebaseRefused,
    rebase_payload,
    rebased_validation,
    reference_digest,
)
from hub.telemetry.drift import psi_per_output

REFERENCE = [{"output_index": 0, "edges": [0.0, 1.0, 2.0, 3.0], "counts": [10, 80, 10]},
             {"output_index": 1, "edges": [-1.0, 0.0, 1.0], "counts": [50, 50],
              "degenerate": True}]
VALIDATION: dict[str, Any] = {"passed": True, "reference_histograms": REFERENCE}


def observed(outputs: list[list[int]], inferences: int = 100) -> Observed:
    return Observed(outputs, inferences, devices=2, assignments=3, first_ts=5, last_ts=9)


def payload(outputs: list[list[int]], inferences: int = 100, min_inferences: int = 100,
            validation: dict[str, Any] = VALIDATION) -> dict[str, Any]:
    return rebase_payload("kws", "1", validation, observed(outputs, inferences),
                          {"rollout": "r-1"}, min_inferences)


@pytest.mark.timeout(10)
def test_the_payload_names_source_new_and_previous_reference() -> None:
    p = payload([[20, 30, 50], [40, 60]])
    assert p["histograms"] == [{"output_index": 0, "counts": [20, 30, 50]},
                               {"output_index": 1, "counts": [40, 60]}]
    assert p["previous_digest"] == reference_digest(REFERENCE)
    assert p["source"] == {"rollout": "r-1", "devices": 2, "assignments": 3,
                           "inferences": 100, "first_ts": 5, "last_ts": 9}
    assert p["min_inferences"] == 100


@pytest.mark.timeout(10)
def test_the_fold_replaces_counts_keeps_edges_and_psi_of_that_traffic_is_zero() -> None:
    traffic = [[20, 30, 50], [40, 60]]
    assert max(psi_per_output(REFERENCE, [[c * 20 for c in h] for h in traffic])) > 0.1
    p = payload(traffic)
    folded = rebased_validation(VALIDATION, p)
    new = folded["reference_histograms"]
    assert [h["edges"] for h in new] == [h["edges"] for h in REFERENCE]
    assert [h["counts"] for h in new] == traffic
    assert all("degenerate" not in h for h in new)  # a re-based reference has spread
    assert reference_digest(new) == p["reference_digest"]
    assert folded["rebased"]["previous_digest"] == reference_digest(REFERENCE)
    assert folded["passed"] is True
    assert psi_per_output(new, [[c * 20 for c in h] for h in traffic]) == [0.0, 0.0]
    # Folding again (a replay) gives the same record; a foreign payload changes nothing.
    assert rebased_validation(VALIDATION, p) == folded
    assert rebased_validation(VALIDATION, {"histograms": [{"counts": [1]}]}) == VALIDATION


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("outputs", "inferences", "validation", "words"), [
    ([[20, 30, 50], [40, 60]], 99, VALIDATION, "at least 100 are needed"),
    ([[20, 30, 50]], 100, VALIDATION, "histograms for 1 output value(s), the reference has 2"),
    ([[20, 30], [40, 60]], 100, VALIDATION, "output 0's reported histogram has 2 bins"),
    ([[0, 100, 0], [40, 60]], 100, VALIDATION, "output(s) 0 fell in fewer than 2 bins"),
    ([[20, -1, 50], [40, 60]], 100, VALIDATION, "output 0's counts are malformed"),
    ([[1]], 100, {"reference_histograms": []}, "no reference histograms"),
    ([[1]], 100, {"reference_histograms": [], "detail": {"digest": "ab"},
                  "reference_histograms_summary": {"outputs": 9000}}, "too large"),
])
def test_too_little_or_malformed_traffic_is_refused_in_one_line(
    outputs: list[list[int]], inferences: int, validation: dict[str, Any], words: str,
) -> None:
    with pytest.raises(RebaseRefused) as info:
        payload(outputs, inferences, validation=validation)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("cannot re-base kws/1: ")


@pytest.mark.timeout(10)
def test_only_operators_rebase() -> None:
    assert VERB_ROLES["model.rebase"] == ("operator",)


@pytest.mark.timeout(10)
def test_the_fleet_histograms_of_a_release_by_rollout_keys_or_start_time(tmp_path: Any) -> None:
    from sqlalchemy import create_engine

    from edge_agent import protocol as proto
    from hub.telemetry.ingest import TelemetryIngest

    def window(device: str, counter: int, start: int, hist: list[list[int]],
               digest: str = "d") -> proto.TelemetryWindow:
        return proto.TelemetryWindow(
            device=device, boot="b", seq=counter, model="kws", version="1", digest=digest,
            start=start, end=start + 1, count=sum(hist[0]), errors=0, latency_ms_p50=0.1,
            latency_ms_p95=0.2, latency_ms_max=0.3, counter=counter, output_hist=hist)

    ingest = TelemetryIngest(create_engine(f"sqlite:///{tmp_path / 't.db'}"))
    for w in (window("a", 1, 10, [[1, 2, 3]]), window("b", 2, 20, [[4, 5, 6]]),
              window("c", 3, 30, [[7, 8, 9]], digest="other")):  # another build: left out
        ingest.check(w)
        assert ingest.offer(w)
    assert ingest.release_histograms("kws", "1", "d") == ([[5, 7, 9]], 21, 2, 2, 10, 21)
    assert ingest.release_histograms("kws", "1", "d", {("b", "d", 2)}) == (
        [[4, 5, 6]], 15, 1, 1, 20, 21)
    assert ingest.release_histograms("kws", "1", "d", since_ns=15)[0] == [[4, 5, 6]]
    assert ingest.release_histograms("kws", "2", "d") == ([], 0, 0, 0, 0, 0)


@pytest.mark.timeout(10)
def test_model_show_says_what_the_reference_was_rebased_on() -> None:
    from hub.cli.models import rebased_text

    folded = rebased_validation(VALIDATION, payload([[20, 30, 50], [40, 60]]))
    assert rebased_text(folded["rebased"]).startswith(
        "drift reference re-based on 100 inferences from 2 device(s) (rollout r-1); reference ")

"""Pure rollout logic: selectors, wave specs and deterministic membership, durations,
the controller's decisions, binning shared by hub and device, and the disk spool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.protocol.bins import LATENCY_BUCKETS_MS, histogram_counts, quantile_from_buckets
from edge_agent.spool import Spool
from edge_agent.telemetry import TelemetryWindowBuilder
from hub.rollouts import rules as ro
from hub.telemetry import drift

NOW = 10**18


def test_selectors_parse_match_and_explain_mistakes() -> None:
    sel = ro.parse_selector("tag:site=a, group=lab")
    assert sel.text == "group=lab,tag:site=a"
    assert sel.matches("d1", "lab", {"site": "a", "x": "y"})
    assert not sel.matches("d1", "lab", {"site": "b"})
    assert not sel.matches("d1", "prod", {"site": "a"})
    assert ro.parse_selector("all").matches("d", "", {})
    assert ro.parse_selector("device=b|a").matches("a", "", {})
    assert not ro.parse_selector("device=b|a").matches("c", "", {})
    for bad, words in (("", "empty target"), ("color=red", "unknown target clause"),
                       ("tag:bad key=1", "invalid tag key")):
        with pytest.raises(ro.RolloutError, match=words):
            ro.parse_selector(bad)


@pytest.mark.parametrize(("spec", "n", "counts"), [
    ("1%,10%,50%,100%", 1000, [10, 100, 500, 1000]),
    ("1%,10%,50%,100%", 50, [1, 5, 25, 50]),
    ("1%,10%,50%,100%", 3, [1, 2, 3]),  # empty waves dropped, each adds a device
    ("5,20,100%", 10, [5, 10]),
    ("all", 7, [7]),
])
def test_wave_counts(spec: str, n: int, counts: list[int]) -> None:
    assert ro.wave_counts(ro.parse_waves(spec), n) == counts


def test_wave_specs_must_reach_everyone() -> None:
    with pytest.raises(ro.RolloutError, match="last wave must be 100%"):
        ro.parse_waves("10%,50%")
    with pytest.raises(ro.RolloutError, match="invalid wave"):
        ro.parse_waves("10%,x,100%")


def test_wave_membership_is_deterministic_and_a_partition() -> None:
    devices = [f"dev-{i:03d}" for i in range(200)]
    waves = ro.parse_waves("1%,10%,50%,100%")
    a = ro.split_waves("r-7", devices, waves)
    b = ro.split_waves("r-7", list(reversed(devices)), waves)
    assert a == b
    assert sorted(d for w in a for d in w) == sorted(devices)
    assert [len(w) for w in a] == [2, 18, 80, 100]
    # Another rollout picks another first wave.
    assert ro.split_waves("r-8", devices, waves)[0] != a[0]


def test_durations() -> None:
    assert ro.parse_duration("60s") == 60.0
    assert ro.parse_duration("10m") == 600.0
    assert ro.parse_duration("500ms") == 0.5
    assert ro.parse_duration(2) == 2.0
    with pytest.raises(ro.RolloutError):
        ro.parse_duration("soon")


def test_transitions_name_what_is_allowed() -> None:
    ro.check_transition("pause", ro.RUNNING, "r-1")
    with pytest.raises(ro.RolloutError, match="cannot resume rollout r-1: it is running; "
                                              "allowed now: pause, abort, rollback"):
        ro.check_transition("resume", ro.RUNNING, "r-1")
    with pytest.raises(ro.RolloutError, match="cannot start rollout r-1: it is aborted; "
                                              "allowed now: rollback"):
        ro.check_transition("start", ro.ABORTED, "r-1")
    with pytest.raises(ro.RolloutError, match="nothing more can happen"):
        ro.check_transition("start", ro.ROLLED_BACK, "r-1")


def wave(index: int, state: str, states: list[str], started: int = NOW,
         baking: int = 0) -> ro.WaveView:
    return ro.WaveView(index, state, {f"d{index}-{i}": s for i, s in enumerate(states)},
                       started, baking)


A, F, P = ro.DEV_APPLIED, ro.DEV_FAILED, ro.DEV_ASSIGNED
GOOD = ro.TelemetryView(inferences=1000, errors=1, p95_ms=1.0, psi=0.01, psi_per_output=(0.01,))


def test_decide_walks_a_healthy_rollout() -> None:
    policy = ro.Policy(bake_s=5, max_psi=0.25, max_error_rate=0.01)
    pending = [wave(0, ro.WAVE_PENDING, [ro.DEV_PLANNED] * 2), wave(1, ro.WAVE_PENDING, [])]
    d = ro.decide(policy, pending, GOOD, NOW)
    assert (d.action, d.wave, d.devices) == (ro.ACT_START_WAVE, 0, ("d0-0", "d0-1"))
    rolling = [wave(0, ro.WAVE_ROLLING, [A, P]), wave(1, ro.WAVE_PENDING, [])]
    assert ro.decide(policy, rolling, GOOD, NOW).action == ro.ACT_NONE
    rolling = [wave(0, ro.WAVE_ROLLING, [A, A]), wave(1, ro.WAVE_PENDING, [])]
    d = ro.decide(policy, rolling, GOOD, NOW)
    assert d.action == ro.ACT_BAKE and d.evidence["success_rate"] == 1.0
    baking = [wave(0, ro.WAVE_BAKING, [A, A], baking=NOW), wave(1, ro.WAVE_PENDING, [])]
    assert ro.decide(policy, baking, GOOD, NOW + 10**9).action == ro.ACT_NONE
    d = ro.decide(policy, baking, GOOD, NOW + 6 * 10**9)
    assert d.action == ro.ACT_COMPLETE_WAVE and d.evidence["psi"] == 0.01
    done = [wave(0, ro.WAVE_DONE, [A, A]), wave(1, ro.WAVE_DONE, [A])]
    d = ro.decide(policy, done, GOOD, NOW)
    assert d.action == ro.ACT_COMPLETE and d.evidence["applied"] == 3


@pytest.mark.parametrize(("states", "telemetry", "reason"), [
    ([A] * 9 + [F], GOOD, "failure rate 0.1000 above 0.05"),
    ([A] * 10, ro.TelemetryView(1000, 50, 1.0, 0.01), "error rate 0.0500 above 0.01"),
    ([A] * 10, ro.TelemetryView(1000, 0, 9.0, 0.01), "p95 latency 9.000 ms above 5 ms"),
    ([A] * 10, ro.TelemetryView(1000, 0, 1.0, 0.9, (0.9,)), "output drift PSI 0.9000 above"),
])
def test_decide_halts_with_the_numbers(states: list[str], telemetry: ro.TelemetryView,
                                       reason: str) -> None:
    policy = ro.Policy(max_failure=0.05, max_error_rate=0.01, max_p95_ms=5, max_psi=0.25)
    d = ro.decide(policy, [wave(0, ro.WAVE_BAKING, states, baking=NOW)], telemetry, NOW)
    assert d.action == ro.ACT_HALT and reason in d.reason
    assert d.evidence["devices"] == 10


def test_silent_devices_time_out_and_too_little_telemetry_waits() -> None:
    policy = ro.Policy(deadline_s=10, min_success=0.5, max_failure=0.5, max_psi=0.2)
    w = [wave(0, ro.WAVE_ROLLING, [A, P])]
    assert ro.decide(policy, w, GOOD, NOW + 5 * 10**9).action == ro.ACT_COMPLETE_WAVE
    sparse = ro.TelemetryView(inferences=3)
    assert ro.decide(policy, w, sparse, NOW + 5 * 10**9).action == ro.ACT_NONE
    d = ro.decide(policy, w, sparse, NOW + 11 * 10**9)
    assert d.action == ro.ACT_TIME_OUT and d.devices == ("d0-1",)
    w = [wave(0, ro.WAVE_ROLLING, [A, ro.DEV_TIMED_OUT])]
    d = ro.decide(policy, w, sparse, NOW + 11 * 10**9)
    assert d.action == ro.ACT_HALT and "only 3 inferences" in d.reason


def test_device_and_hub_bin_values_the_same_way() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(500, 3)).astype(np.float32)
    edges = [[-1.0, -0.2, 0.0, 0.3, 1.0], [-2.0, 0.0, 2.0], [0.0, 0.1]]
    builder = TelemetryWindowBuilder()
    builder.set_drift_bins(edges)
    for row in values:
        builder.record(0.3, True, row[None, :])
    summary = builder.take()
    assert summary is not None
    for k, e in enumerate(edges):
        assert summary["output_hist"][k] == drift.histogram_counts(values[:, k], e)
    assert summary["latency_buckets"][LATENCY_BUCKETS_MS.index(0.5)] == 500
    p95 = quantile_from_buckets(summary["latency_buckets"], 0.95)
    assert p95 == pytest.approx(0.25 + 0.25 * 0.95)  # interpolated in (0.25, 0.5]
    assert histogram_counts([float("nan"), -9, 9], [0.0, 1.0, 2.0]) == [1, 2]


def test_spool_survives_reopen_bounds_itself_and_counts_drops(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=400, fsync=True)
    for i in range(3):
        spool.append("fleet.report.d.telemetry", f"d.b.{i}", bytes(50))
    reopened = Spool(tmp_path / "spool", max_bytes=400)
    assert len(reopened) == 3 and reopened.dropped == 0
    first = reopened.peek()
    assert first is not None and first.msg_id == "d.b.0"
    reopened.ack(first)
    for i in range(3, 10):
        reopened.append("fleet.report.d.telemetry", f"d.b.{i}", bytes(50))
    assert reopened.size_bytes <= 400 and reopened.dropped > 0
    again = Spool(tmp_path / "spool", max_bytes=400)
    assert again.dropped == reopened.dropped  # loss is remembered, never silent
    head = again.peek()
    assert head is not None and head.msg_id == f"d.b.{1 + again.dropped}"
    (tmp_path / "spool" / f"{head.number:016d}.rec").write_bytes(b"\xc1garbage")
    nxt = again.peek()
    assert nxt is not None and nxt.number == head.number + 1
    assert again.dropped == reopened.dropped + 1

"""Drift that means something: one binning rule over the same (dequantized) values on
the hub and the device, reference bins that never collapse, a degenerate reference
flagged, and a real agent fed the validation inputs through its inference API.

The pure tests need no server; the last two run a hub, a real agent process and a
rollout with a PSI gate (tests/fleet.py), an application calling the agent's API.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from edge_agent import protocol as proto
from edge_agent.errors import ProtocolError
from edge_agent.protocol import bins
from edge_agent.runtime import LoadedModel, describe
from edge_agent.serving.client import InferenceClient
from edge_agent.telemetry import TelemetryWindowBuilder
from hub import events as ev
from hub.cli.models import tensor_text
from hub.governance.manifests import drift_tensors
from hub.governance.models import manifest_quantization
from hub.rebuild import live_digest, rebuild_digest
from hub.telemetry.drift import psi, psi_per_output, quantile_edges, reference_histogram
from hub.validation import Dataset, ModelError, Policy, validate
from hub.validation.runner import Runner
from ledger.encoding import canonical_decode, canonical_encode
from testkit.modelgen import make_dense_model, make_int8_dense_model, make_two_head_model
from tests.device_kit import configured_agent
from tests.fleet import Fleet, refused

N_IN, N_OUT, ROWS = 8, 4, 400
PSI_NEAR_ZERO = 0.1  # "stable" in the usual reading of PSI; the gate threshold below


def _int8_model(tmp: Path) -> tuple[Path, NDArray[np.float32]]:
    """An int8 model from testkit/modelgen and ROWS float validation inputs in [-1, 1]."""
    rng = np.random.default_rng(11)
    w, b = rng.standard_normal((N_OUT, N_IN)), rng.standard_normal(N_OUT) * 0.1
    x = rng.uniform(-1, 1, (ROWS, N_IN)).astype(np.float32)
    path = tmp / "kws-int8.tflite"
    path.write_bytes(make_int8_dense_model(w, b, x))
    return path, x


def _quantize(x: NDArray[Any], scale: float, zero_point: int) -> NDArray[np.int8]:
    """What an application does with a float feature row for an int8 input (the hub's
    validation runner does the same: round, shift, clip)."""
    q = np.round(np.asarray(x, dtype=np.float64) / scale) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


# ---------------------------------------------------------------- the bin rule (pure)


def test_tie_heavy_output_gets_its_mode_isolated_and_the_rest_binned() -> None:
    rng = np.random.default_rng(0)
    for zeros in (900, 950):  # a detector that outputs 0 on 90% (95%) of the rows
        values = np.concatenate([np.zeros(zeros), rng.uniform(0.1, 1.0, 1000 - zeros)])
        rng.shuffle(values)
        edges = quantile_edges(values, 10)
        counts = bins.histogram_counts(values, edges)
        assert sum(c > 0 for c in counts) >= 2
        assert counts[0] == zeros  # the mode alone in its bin
        assert len(counts) >= 6 and min(counts[1:]) >= 1  # the rest is not one lump
        hist = reference_histogram(0, values, 10)
        assert not hist.degenerate and hist.counts == counts
    # A mass at the top (a saturated score) is isolated the same way.
    values = np.concatenate([np.ones(900), rng.uniform(0.0, 0.9, 100)])
    counts = bins.histogram_counts(values, quantile_edges(values, 10))
    assert counts[-1] == 900 and sum(c > 0 for c in counts) >= 2


def test_edges_without_ties_are_the_plain_quantiles_as_before() -> None:
    values = np.random.default_rng(1).standard_normal(500)
    q = np.quantile(values, np.linspace(0, 1, 11))
    pad = (values.max() - values.min()) * 1e-3
    expected = [q[0] - pad, *q[1:-1], q[-1] + pad]
    assert quantile_edges(values, 10) == [float(v) for v in expected]


def test_a_constant_output_is_flagged_degenerate_at_validation(tmp_path: Path) -> None:
    hist = reference_histogram(0, np.full(50, 0.25), 10)
    assert hist.degenerate and hist.to_payload()["degenerate"] is True
    assert sum(c > 0 for c in hist.counts) == 1  # no spread: nothing to split
    assert bins.histogram_counts([0.2, 0.25, 0.3], hist.edges) == [1, 1, 1]  # below/at/above
    # Through the gate: a model whose output is the same for every row.
    path = tmp_path / "constant.tflite"
    path.write_bytes(make_dense_model(np.zeros((2, N_IN)), np.array([0.5, -0.5])))
    x = np.random.default_rng(2).uniform(-1, 1, (60, N_IN)).astype(np.float32)
    report = validate(path, Dataset(x, None, None), Policy("constant", "regression"))
    assert [h.degenerate for h in report.reference_histograms] == [True, True]
    assert len(report.warnings) == 1 and "output(s) 0, 1 has no spread" in report.warnings[0]
    payload = report.to_payload()
    assert payload["warnings"] == report.warnings
    assert all(h["degenerate"] for h in payload["reference_histograms"])
    # A model with spread carries no flag and no warnings key (payload as before).
    spread = tmp_path / "spread.tflite"
    spread.write_bytes(make_dense_model(np.eye(2, N_IN), np.zeros(2)))
    payload = validate(spread, Dataset(x, None, None), Policy("ok", "regression")).to_payload()
    assert "warnings" not in payload
    assert not any("degenerate" in h for h in payload["reference_histograms"])


# ---------------------------------------------------------------- both sides (pure)


def test_agent_dequantize_and_bin_equals_the_hub_reference(tmp_path: Path) -> None:
    path, x = _int8_model(tmp_path)
    model = LoadedModel.load(path)
    out = model.outputs[0]
    assert out.dtype == "int8" and out.quantization[0] > 0
    # Hub side: the validation runner's outputs (dequantized) and their reference bins.
    runner = Runner(model, (N_IN,))
    real = runner.run_rows(x.astype(np.float64))
    reference = [reference_histogram(k, real[:, k], 10) for k in range(N_OUT)]
    # Device side: the raw int8 outputs of the same inputs, into a telemetry window set up
    # from what the manifest says (edges, the output's scale and zero point).
    window = TelemetryWindowBuilder()
    window.set_drift_bins([h.edges for h in reference], list(out.quantization))
    scale, zero_point = model.inputs[0].quantization
    for row in x:
        raw = model.run(_quantize(row[None, :], scale, zero_point))
        assert raw.dtype == np.int8
        np.testing.assert_array_equal(bins.dequantize(raw, *out.quantization),
                                      runner.decode(raw))
        window.record(0.1, True, raw)
    summary = window.take()
    assert summary is not None
    assert summary["output_hist"] == [h.counts for h in reference]
    assert max(psi(h.counts, o) for h, o in zip(reference, summary["output_hist"],
                                                  strict=True)) == 0.0
    # A float output is binned as it is (no quantization, or scale 0).
    assert bins.dequantize(np.array([1.5], np.float32), 0.5, 3).tolist() == [1.5]


def test_manifest_carries_quantization_optionally(tmp_path: Path) -> None:
    path, _ = _int8_model(tmp_path)
    signature = describe(path)
    q_out = signature["outputs"][0]["quantization"]
    assert q_out["scale"] > 0 and isinstance(q_out["zero_point"], int)
    quant = manifest_quantization(signature["inputs"], signature["outputs"])
    assert quant["outputs"] == [{"dtype": "int8", **q_out}]
    manifest = proto.ReleaseManifest(
        name="kws", version="1", digest="ab" * 32, size=1, format="tflite",
        inputs=signature["inputs"], outputs=signature["outputs"], created=1, expires=2,
        drift_bins=[[0.0, 1.0]], quantization=quant)
    doc = canonical_decode(canonical_encode(manifest.to_map()))
    again = proto.ReleaseManifest.from_map(doc)
    assert again == manifest
    assert again.tensor_quantization("outputs") == [
        ("int8", q_out["scale"], q_out["zero_point"])]
    # A manifest from before the field: decodes, says nothing (devices then ask the model).
    old = {k: v for k, v in doc.items() if k != "quantization"}
    assert proto.ReleaseManifest.from_map(old).tensor_quantization("outputs") == []
    # A model registered before signatures carried quantization: no field in the manifest.
    assert manifest_quantization([{"name": "input", "dtype": "int8"}], []) == {}
    for bad in ({"outputs": [{"dtype": "int8", "scale": -1.0, "zero_point": 0}]},
                {"outputs": [{"dtype": "int8", "scale": 0.1, "zero_point": 1.5}]},
                {"outputs": "int8"}):
        with pytest.raises(ProtocolError, match="quantization"):
            proto.ReleaseManifest.from_map(doc | {"quantization": bad})


def test_every_output_tensor_is_binned_with_its_own_quantization() -> None:
    """Two output tensors (an int8 one with its own scale and zero point, a float one),
    the first 3 and 2 values watched: the device's histograms are, value by value, the
    hub's reference counts of the same real values, and the hub's layout of them is the
    manifest's drift_tensors."""
    rng = np.random.default_rng(5)
    q0 = (0.05, -3)
    raw0 = rng.integers(-128, 128, (300, 1, 6)).astype(np.int8)
    real0 = (raw0.astype(np.float64) - q0[1]) * q0[0]
    out1 = rng.normal(0, 1, (300, 2, 2)).astype(np.float32)
    columns = [real0[:, 0, k] for k in range(3)] + [
        out1.reshape(300, -1)[:, k].astype(np.float64) for k in range(2)]
    reference = [reference_histogram(k, v, 8, tensor=0 if k < 3 else 1)
                 for k, v in enumerate(columns)]
    payload = [h.to_payload() for h in reference]
    assert drift_tensors(payload) == [3, 2]
    assert drift_tensors([h for h in payload if "tensor" not in h]) == []  # first only
    window = TelemetryWindowBuilder()
    window.set_drift_bins([h.edges for h in reference], tensors=[3, 2],
                          tensor_quantization=[q0, (0.0, 0)])
    for i in range(300):
        window.record(0.1, True, [raw0[i], out1[i]])
    summary = window.take()
    assert summary is not None
    assert summary["output_hist"] == [h.counts for h in reference]
    assert max(psi(h.counts, o) for h, o in zip(reference, summary["output_hist"],
                                                  strict=True)) == 0.0
    # Only the first tensor (the synthetic load's single output): its values, no others.
    window.set_drift_bins([h.edges for h in reference], tensors=[3, 2],
                          tensor_quantization=[q0, (0.0, 0)])
    window.record(0.1, True, raw0[0])
    only_first = window.take()
    assert only_first is not None
    assert [sum(h) for h in only_first["output_hist"]] == [1, 1, 1, 0, 0]


def test_the_gate_references_every_output_tensor_and_a_device_matches_it(
        tmp_path: Path) -> None:
    """A two-output model through the gate: references for each output tensor's values,
    in tensor order; the layout is what the manifest carries; a device counting the
    validation inputs' outputs on it gets PSI 0 for every value of both tensors.
    Too many values in all is refused at validation, naming the policy key."""
    rng = np.random.default_rng(4)
    path = tmp_path / "two.tflite"
    path.write_bytes(make_two_head_model([(rng.normal(size=(3, 6)), rng.normal(size=3)),
                                          (rng.normal(size=(70, 6)), rng.normal(size=70))],
                                         shared_input=True))
    x = rng.uniform(-1, 1, (400, 6)).astype(np.float32)
    with pytest.raises(ModelError, match=r"'out_b' has 70 values \(3 \+ 70 over 2 output "
                                         r"tensors\).*drift_values = N \(1..32\)"):
        validate(path, Dataset(x), Policy("two", "none"))
    with pytest.raises(ModelError, match=r"drift_values = 62 watches 65 values.*at most 32"):
        validate(path, Dataset(x), Policy("two", "none", drift_values=62))
    report = validate(path, Dataset(x), Policy("two", "none", drift_values=8,
                                               max_flip_rate=1.0))
    assert report.metrics["drift_values"]["tensors"] == [
        {"name": "out_a", "watched": 3, "of": 3}, {"name": "out_b", "watched": 8, "of": 70}]
    payload = [h.to_payload() for h in report.reference_histograms]
    assert drift_tensors(payload) == [3, 8]
    window = TelemetryWindowBuilder()
    window.set_drift_bins([h["edges"] for h in payload], tensors=drift_tensors(payload),
                          tensor_quantization=[(0.0, 0), (0.0, 0)])
    model = LoadedModel.load(path)
    for row in x:
        window.record(0.1, True, model.run_all([row[None]]))
    summary = window.take()
    assert summary is not None
    assert summary["output_hist"] == [h["counts"] for h in payload]
    assert psi_per_output(payload, summary["output_hist"]) == [0.0] * 11


def test_manifest_drift_tensors_must_add_up() -> None:
    manifest = proto.ReleaseManifest(
        name="faces", version="1", digest="ab" * 32, size=1, format="tflite",
        inputs=[], outputs=[], created=1, expires=2, drift_bins=[[0.0, 1.0]] * 5,
        drift_tensors=[3, 2])
    doc = canonical_decode(canonical_encode(manifest.to_map()))
    assert proto.ReleaseManifest.from_map(doc).drift_layout() == [3, 2]
    old = {k: v for k, v in doc.items() if k != "drift_tensors"}  # all of the first
    assert proto.ReleaseManifest.from_map(old).drift_layout() == [5]
    for bad in ([3, 3], [-1, 6], [True, 4], ["3", 2]):
        with pytest.raises(ProtocolError, match="drift_tensors"):
            proto.ReleaseManifest.from_map(doc | {"drift_tensors": bad})


def test_manifest_carries_run_shapes_optionally() -> None:
    manifest = proto.ReleaseManifest(
        name="mel", version="1", digest="ab" * 32, size=1, format="tflite",
        inputs=[], outputs=[], created=1, expires=2, drift_bins=[],
        input_shapes={"audio": [1, 1280]})
    doc = canonical_decode(canonical_encode(manifest.to_map()))
    assert proto.ReleaseManifest.from_map(doc).run_shapes() == {"audio": [1, 1280]}
    old = {k: v for k, v in doc.items() if k != "input_shapes"}  # an older hub's
    assert proto.ReleaseManifest.from_map(old).run_shapes() == {}
    for bad in ({"audio": [1, -1]}, {"audio": []}, {"audio": [1] * 9}, {"audio": "1x1280"},
                {"audio": [1, True]}, {"audio": [1, 0]}):
        with pytest.raises(ProtocolError, match="input_shapes"):
            proto.ReleaseManifest.from_map(doc | {"input_shapes": bad})


# ---------------------------------------------------------------- a real agent


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fl-drift-"))  # short: a socket path has a limit
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _rollout_fed_by_application(fleet: Fleet, sock_dir: Path, offset: float,
                                      two_heads: bool = False, max_psi: float = PSI_NEAR_ZERO,
                                      device: str = "app-0", release: bool = True,
                                      ) -> tuple[str, dict[str, Any]]:
    """Release the int8 model (or, `two_heads`, a float model with two output tensors;
    validated on x), deploy it to one real agent by a rollout with a PSI gate, and have
    an application call the agent's API with x + offset. Returns how the rollout ended
    (`completed` or `halted`) and that event's payload. `release=False`: kws/1 is
    released already (by an earlier call); only the rollout to `device` is new."""
    policy = fleet.config.policy_path
    policy.write_text('[default]\ntask = "classification"\nhistogram_bins = 5\n'
                      'approvals_required = 1\n[models.kws]\n'
                      + ('task = "none"\nmax_flip_rate = 1.0\n' if two_heads else ""))
    data = fleet.root / "validation.npz"
    if two_heads:
        rng = np.random.default_rng(12)
        path = fleet.root / "two.tflite"
        path.write_bytes(make_two_head_model(
            [(rng.normal(size=(3, N_IN)), rng.normal(size=3)),
             (rng.normal(size=(4, N_IN)), rng.normal(size=4))], shared_input=True))
        x = rng.uniform(-1, 1, (ROWS, N_IN)).astype(np.float32)
        np.savez(data, inputs=x)
    else:
        path, x = _int8_model(fleet.root)
        model = LoadedModel.load(path)
        labels = Runner(model, (N_IN,)).run_rows(x.astype(np.float64)).argmax(axis=1)
        np.savez(data, inputs=x, labels=labels)
    socket_path = sock_dir / f"{device}.sock"
    agent = configured_agent(fleet, device, ["--api-socket", str(socket_path)])
    agent.synthetic_load = False  # only the application's calls run the model
    async with await fleet.client() as admin, \
            await fleet.client(fleet.approver_key) as approver:
        if release:
            await admin.register_model(path, "kws", "1")
            validated = await admin.validate_model("kws", "1", data)
            assert validated["passed"] and validated["warnings"] == [], validated
            await approver.call("model.approve", {"name": "kws", "version": "1"})
            await admin.call("model.release", {"name": "kws", "version": "1"})
        await admin.call("device.enroll", {"device": device})
        agent.start()
        # The gate judges once every call is counted (min_inferences = ROWS).
        rid = (await admin.call("rollout.create", {
            "model": "kws", "version": "1", "target": f"device={device}", "waves": "100%",
            "min_success": 1.0, "max_failure": 0.0, "deadline": "90s", "bake": "1s",
            "max_psi": max_psi, "min_inferences": ROWS}))["rollout"]
        await admin.call("rollout.start", {"rollout": rid})
        await fleet.feed.wait_for(lambda _: bool(fleet.feed.of_kind(
            ev.DEVICE_UPDATE_APPLIED, device)), timeout=60, what="the install")

        def application() -> int:
            with InferenceClient(socket_path, timeout=10) as api:
                info = api.info()["inputs"][0]["quantization"]
                scale, zero_point = float(info["scale"]), int(info["zero_point"])
                for row in x + np.float32(offset):
                    if two_heads:  # float32 input, as it is
                        assert len(api.predict({"input": row[None, :]})) == 2
                    else:
                        api.predict({"input": _quantize(row[None, :], scale, zero_point)})
            return len(x)

        assert await asyncio.get_running_loop().run_in_executor(None, application) == ROWS
        ended = await fleet.feed.wait_for(
            lambda es: any(e.kind in (ev.ROLLOUT_COMPLETED, ev.ROLLOUT_HALTED)
                           and e.payload.get("rollout") == rid for e in es),
            timeout=90, what=f"rollout {rid} to end")
    last = next(e for e in ended if e.kind in (ev.ROLLOUT_COMPLETED, ev.ROLLOUT_HALTED)
                and e.payload.get("rollout") == rid)
    return last.kind, dict(last.payload)


@pytest.mark.timeout(180)
async def test_int8_model_fed_its_validation_inputs_has_psi_near_zero(
    fleet: Fleet, sock_dir: Path,
) -> None:
    kind, payload = await _rollout_fed_by_application(fleet, sock_dir, offset=0.0)
    assert kind == ev.ROLLOUT_COMPLETED, payload
    evidence = payload["evidence"]
    assert evidence["inferences"] == ROWS and evidence["errors"] == 0
    assert evidence["psi"] < PSI_NEAR_ZERO, evidence  # before the fix: raw ints, PSI ~ 9


@pytest.mark.timeout(180)
async def test_shifted_application_inputs_halt_the_rollout_on_drift(
    fleet: Fleet, sock_dir: Path,
) -> None:
    kind, payload = await _rollout_fed_by_application(fleet, sock_dir, offset=0.6)
    assert kind == ev.ROLLOUT_HALTED, payload
    assert "output drift PSI" in payload["reason"]
    assert payload["evidence"]["psi"] > PSI_NEAR_ZERO


@pytest.mark.timeout(300)
async def test_a_reference_rebased_on_fleet_traffic_makes_that_traffic_stable(
    fleet: Fleet, sock_dir: Path,
) -> None:
    """The fleet's inputs moved (+0.6) and the operator accepts it: a rollout without a
    tight PSI gate bakes on that traffic (PSI high against the validation reference),
    `model.rebase --rollout` takes its histograms as the reference, PSI of that same
    traffic is then ~0, the ledger replays to the same state, and a further shift
    (-0.4, on another device) still halts a rollout with a PSI gate."""
    kind, payload = await _rollout_fed_by_application(fleet, sock_dir, offset=0.6,
                                                      max_psi=1e6)
    assert kind == ev.ROLLOUT_COMPLETED, payload
    rid, before = payload["rollout"], payload["evidence"]["psi"]
    assert before > PSI_NEAR_ZERO, payload
    async with await fleet.client() as admin:
        body = {"name": "kws", "version": "1", "rollout": rid}
        await refused(fleet, admin, "model.rebase", body | {"min_inferences": ROWS + 1},
                      f"reported {ROWS} inferences", f"at least {ROWS + 1:,} are needed")
        await refused(fleet, admin, "model.rebase", body | {"rollout": "r-nope"},
                      "no rollout r-nope")
        async with await fleet.client(fleet.approver_key) as approver:
            await refused(fleet, approver, "model.rebase", body | {"min_inferences": ROWS},
                          "model.rebase needs operator")
        # Through the CLI, so its --json document is checked against its schema too.
        done = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "hub.cli", "model", "rebase", "kws/1", "--rollout", rid,
            "--min-inferences", str(ROWS), "--json", "--home", str(fleet.config.home),
            "--key", str(fleet.config.operator_key_path("admin"))],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["source"] == {"rollout": rid, "devices": 1, "assignments": 1,
                                    "inferences": ROWS, "first_ts": answer["source"]["first_ts"],
                                    "last_ts": answer["source"]["last_ts"]}
        after = (await admin.call("rollout.status", {"rollout": rid}))["telemetry"]["psi"]
        assert after < 0.01 < before, (after, before)
        shown = (await admin.call("model.show", {"name": "kws", "version": "1"}))[0]
    [event] = fleet.feed.of_kind(ev.MODEL_REFERENCE_REBASED)
    assert event.payload["previous_digest"] == answer["previous_digest"]
    assert shown["validation"]["rebased"]["reference_digest"] == answer["reference_digest"]
    assert [sum(h["counts"]) for h in shown["validation"]["reference_histograms"]] == \
        [ROWS] * N_OUT
    rebuilt, _ = rebuild_digest(fleet.hub.store)
    assert rebuilt == live_digest(fleet.hub.store)
    kind, payload = await _rollout_fed_by_application(fleet, sock_dir, offset=-0.4,
                                                      device="app-1", release=False)
    assert kind == ev.ROLLOUT_HALTED, payload
    assert payload["evidence"]["psi"] > PSI_NEAR_ZERO


@pytest.mark.timeout(180)
@pytest.mark.parametrize("offset", [0.0, 0.6], ids=["validation inputs", "shifted"])
async def test_a_two_output_model_is_gated_on_the_worst_psi_of_both_tensors(
    fleet: Fleet, sock_dir: Path, offset: float,
) -> None:
    """Both output tensors are watched (3 + 4 values): fed its validation inputs the
    rollout completes with PSI ~0 over all 7; shifted inputs halt it on drift."""
    kind, payload = await _rollout_fed_by_application(fleet, sock_dir, offset,
                                                      two_heads=True)
    [released] = [e for e in fleet.feed.of_kind(ev.MODEL_RELEASED)]
    manifest = proto.ReleaseManifest.from_map(proto.SignedEnvelope.decode(
        released.payload["manifest"]).document("manifest"))
    assert manifest.drift_layout() == [3, 4]
    evidence = payload["evidence"]
    [row] = fleet.hub.telemetry.device_rows("app-0")  # what the hub aggregated
    assert [sum(h) for h in row["output_hist"]] == [ROWS] * 7
    if offset == 0.0:
        assert kind == ev.ROLLOUT_COMPLETED, payload
        assert evidence["inferences"] == ROWS and evidence["psi"] < PSI_NEAR_ZERO, evidence
    else:
        assert kind == ev.ROLLOUT_HALTED, payload
        assert "output drift PSI" in payload["reason"]
        assert evidence["psi"] > PSI_NEAR_ZERO


async def test_a_psi_gate_on_a_flagged_model_is_refused_as_blind(fleet: Fleet) -> None:
    fleet.config.policy_path.write_text('[default]\ntask = "regression"\n')
    path = fleet.root / "constant.tflite"
    path.write_bytes(make_dense_model(np.zeros((2, N_IN)), np.array([0.5, -0.5])))
    x = np.random.default_rng(3).uniform(-1, 1, (60, N_IN)).astype(np.float32)
    data = fleet.root / "constant.npz"
    np.savez(data, inputs=x)
    async with await fleet.client() as admin, \
            await fleet.client(fleet.approver_key) as approver:
        await admin.register_model(path, "kws", "1")
        validated = await admin.validate_model("kws", "1", data)
        assert validated["passed"] and "has no spread" in validated["warnings"][0]
        await approver.call("model.approve", {"name": "kws", "version": "1"})
        await admin.call("model.release", {"name": "kws", "version": "1"})
        await admin.call("device.enroll", {"device": "d-0"})
        body = {"model": "kws", "version": "1", "target": "device=d-0"}
        await refused(fleet, admin, "rollout.create", body | {"max_psi": 0.25},
                      "PSI gate (--max-psi) would be blind", "output(s) 0, 1 has no spread")
        assert (await admin.call("rollout.create", body))["rollout"]  # without the gate
        shown = (await admin.call("model.show", {"name": "kws", "version": "1"}))[0]
    assert shown["validation"]["warnings"] == validated["warnings"]
    assert [tensor_text(t) for t in shown["outputs"]] == ["output [1, 2] float32 not quantized"]


def test_model_show_prints_each_tensor_with_its_quantization() -> None:
    q = {"scale": 0.0425545, "zero_point": -27}
    assert tensor_text({"name": "output", "shape": [1, 4], "dtype": "int8",
                        "quantization": q}) == "output [1, 4] int8 scale=0.0425545 zero_point=-27"
    assert tensor_text({"name": "[red]x", "shape": [1], "dtype": "int8"}) == (
        "\\[red]x [1] int8 (quantization not recorded)")

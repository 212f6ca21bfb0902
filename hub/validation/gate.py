"""The gate itself: `validate` runs the model over the data once, then holds the numbers to
the policy as a table of checks; `ValidationReport` is what it found.

`validate` measures quality (accuracy or MAE), the gap of that metric between groups
(fairness), the share of predictions that change under input noise (robustness),
permutation importance per input feature, latency percentiles, and the reference output
histograms whose bin edges go into the release manifest for drift. A model that runs
but misses a threshold is not an error: it is a report with `passed=False` whose
failures are sentences a person can act on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import blake3
import numpy as np
from numpy.typing import NDArray

from hub.telemetry.drift import ReferenceHistogram, drift_blind_warning, reference_histogram
from hub.validation import checks
from hub.validation.dataset import Dataset
from hub.validation.errors import DatasetError, ModelError
from hub.validation.policy import Policy, Task
from hub.validation.runner import Runner, load_model

_WARMUP_RUNS = 3


@dataclass(frozen=True)
class ValidationReport:
    passed: bool
    failures: list[str]
    metrics: dict[str, Any]
    reference_histograms: list[ReferenceHistogram]
    policy: Policy
    model_digest: str  # BLAKE3 hex of the model file, as in model.registered
    dataset_digest: str  # `Dataset.digest`
    # Flags that do not fail the gate (a reference without spread: drift is blind).
    warnings: list[str] = field(default_factory=list)

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
                **({"warnings": self.warnings} if self.warnings else {}),
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


# --- The checks ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Measured:
    """One run's numbers: the metrics of the report, plus what the sentences name."""

    metrics: dict[str, Any]
    worst_group: str = ""
    best_group: str = ""


@dataclass(frozen=True)
class _Check:
    """One policy threshold: the metric it reads, which side of the bound fails, and the
    sentence for a failure (given both numbers, formatted so that they differ)."""

    threshold: str  # the Policy field holding the bound; None there: not checked
    bound: Literal["min", "max"]
    value: Callable[[_Measured], float | None]  # None: the data cannot give this metric
    fails_as: Callable[[str, str, _Measured, Policy], str]
    unmeasurable: Callable[[_Measured], str] = lambda m: ""


def _no_labels(metric: str) -> Callable[[_Measured], str]:
    return lambda m: f"{metric} cannot be checked: the validation data has no labels"


def _gap_failure(a: str, b: str, m: _Measured, policy: Policy) -> str:
    name = checks.metric_name(policy.task)
    groups = m.metrics["groups"]
    return (f"{name} gap between groups {a} (group {m.worst_group!r} "
            f"{groups[m.worst_group][name]:.4g} vs group {m.best_group!r} "
            f"{groups[m.best_group][name]:.4g}) is above the policy maximum {b}")


def _gap_unmeasurable(m: _Measured) -> str:
    has_labels = "accuracy" in m.metrics or "mae" in m.metrics
    missing = "labels" if not has_labels else "groups"
    return f"group gap cannot be checked: the validation data has no {missing}"


# In the order the failures are reported.
CHECKS: tuple[_Check, ...] = (
    _Check("min_accuracy", "min", lambda m: m.metrics.get("accuracy"),
           lambda a, b, m, p: f"accuracy {a} is below the policy minimum {b}",
           _no_labels("accuracy")),
    _Check("max_mae", "max", lambda m: m.metrics.get("mae"),
           lambda a, b, m, p: f"MAE {a} is above the policy maximum {b}",
           _no_labels("mae")),
    _Check("max_group_gap", "max", lambda m: m.metrics.get("group_gap"),
           _gap_failure, _gap_unmeasurable),
    _Check("max_flip_rate", "max", lambda m: m.metrics["flip_rate"],
           lambda a, b, m, p: f"flip rate under input noise (noise_std {p.noise_std:g}) "
                              f"{a} is above the policy maximum {b}"),
    _Check("max_p95_latency_ms", "max", lambda m: m.metrics["latency_ms"]["p95"],
           lambda a, b, m, p: f"p95 latency {a} ms is above the policy maximum {b} ms"),
)


def _fmt(value: float, other: float) -> tuple[str, str]:
    """Both numbers with enough digits that they do not print the same."""
    for digits in range(4, 12):
        a, b = f"{value:.{digits}g}", f"{other:.{digits}g}"
        if a != b:
            return a, b
    return repr(value), repr(other)


def failures(measured: _Measured, policy: Policy) -> list[str]:
    """The sentence of every check whose threshold the policy sets and the run misses."""
    out: list[str] = []
    for check in CHECKS:
        bound = getattr(policy, check.threshold)
        if bound is None:
            continue
        value = check.value(measured)
        if value is None:
            out.append(check.unmeasurable(measured))
        elif (value < bound) if check.bound == "min" else (value > bound):
            a, b = _fmt(value, bound)
            out.append(check.fails_as(a, b, measured, policy))
    return out


# --- The run ---------------------------------------------------------------------------


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



def validate(
    model_path: Path, dataset: Dataset, policy: Policy, rng_seed: int = 0
) -> ValidationReport:
    """Run the model over `dataset`, measure, and check the numbers against `policy`.

    Cost: N * (2 + IMPORTANCE_REPEATS * features) single-row inferences (baseline,
    noisy copy, one pass per shuffled feature and repeat), plus a child-process
    preflight of the model.
    """
    model_path = Path(model_path)
    try:
        model_bytes = model_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {model_path}: {exc}") from exc
    runner = Runner(load_model(model_bytes, model_path), tuple(dataset.inputs.shape[1:]))
    rng = np.random.default_rng(rng_seed)
    task = policy.task
    x = dataset.inputs

    for _ in range(_WARMUP_RUNS):
        runner.run_rows(x[:1])
    latencies: list[float] = []
    outputs = runner.run_rows(x, latencies)
    n_outputs = int(outputs.shape[1])
    labels = _checked_labels(dataset, task, n_outputs)
    metrics: dict[str, Any] = {"rows": len(dataset), "outputs": n_outputs, "task": task}

    # Reference histograms first: regression flips are counted on their bins.
    histograms = [reference_histogram(k, outputs[:, k], policy.histogram_bins)
                  for k in range(n_outputs)]

    # The measurements, in this order: the random generator is shared.
    worst = best = ""
    if labels is not None:
        metrics[checks.metric_name(task)] = checks.score(outputs, labels, task)
        if dataset.groups is not None:
            per_group, worst, best = checks.group_metrics(outputs, labels, dataset.groups, task)
            name = checks.metric_name(task)
            metrics["groups"] = per_group
            metrics["group_gap"] = abs(per_group[best][name] - per_group[worst][name])
    metrics["noise_std"] = policy.noise_std
    metrics["flip_rate"] = checks.flip_rate(runner.run_rows, x, outputs, histograms[0].edges,
                                            task, policy.noise_std, rng)
    metrics["permutation_importance"] = checks.permutation_importance(
        runner.run_rows, x, outputs, labels, task, rng
    )
    metrics["importance_basis"] = checks.importance_basis(task, labels is not None)
    metrics["importance_repeats"] = checks.IMPORTANCE_REPEATS
    # Latency, as measured on the hub (not the device): a sanity bound.
    metrics["latency_ms"] = checks.percentiles(latencies)

    found = failures(_Measured(metrics, worst, best), policy)
    blind = drift_blind_warning([h.output_index for h in histograms if h.degenerate])
    return ValidationReport(
        passed=not found,
        failures=found,
        metrics=metrics,
        reference_histograms=histograms,
        policy=policy,
        model_digest=blake3.blake3(model_bytes).hexdigest(),
        dataset_digest=dataset.digest,
        warnings=[blind] if blind else [],
    )

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import blake3
import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol import MAX_OUTPUTS
from hub.telemetry.drift import (
    ReferenceHistogram,
    drift_blind_warning,
    quantile_edges,
    reference_histogram,
)
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


def _binary_check(threshold: str, bound: Literal["min", "max"], metric: str, label: str,
                  needs: str) -> _Check:
    """A binary detector's threshold on `metrics["binary"][metric]`; unmeasurable when
    the data has no labels or not the rows (`needs`) the metric is defined on."""
    side = "below the policy minimum" if bound == "min" else "above the policy maximum"

    def fails_as(a: str, b: str, m: _Measured, p: Policy) -> str:
        return f"{label} {a} at threshold {m.metrics['binary']['threshold']:g} is {side} {b}"

    def unmeasurable(m: _Measured) -> str:
        why = "no labels" if "binary" not in m.metrics else f"no {needs}"
        return f"{label} cannot be checked: the validation data has {why}"

    return _Check(threshold, bound, lambda m: m.metrics.get("binary", {}).get(metric),
                  fails_as, unmeasurable)


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
    *(_binary_check(*row) for row in (
        ("min_precision", "min", "precision", "precision",
         "row scored at or above the threshold"),
        ("min_recall", "min", "recall", "recall", "positive rows (label 1)"),
        ("max_far", "max", "far", "false accept rate", "negative rows (label 0)"),
        ("max_frr", "max", "frr", "false reject rate", "positive rows (label 1)"),
        ("min_roc_auc", "min", "roc_auc", "ROC AUC", "rows of both classes"))),
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


# Checks of the model's quality against labels: skipped, and said so, in metrics-only
# mode (task "none", or validation data without labels).
QUALITY_CHECKS = frozenset({"min_accuracy", "max_mae", "max_group_gap", "min_precision",
                            "min_recall", "max_far", "max_frr", "min_roc_auc"})


def failures(measured: _Measured, policy: Policy) -> list[str]:
    """The sentence of every check whose threshold the policy sets and the run misses."""
    out: list[str] = []
    metrics_only = measured.metrics.get("mode") == "metrics_only"
    for check in CHECKS:
        bound = getattr(policy, check.threshold)
        if bound is None or (metrics_only and check.threshold in QUALITY_CHECKS):
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
    """The labels as the task reads them; None in metrics-only mode (no labels, or task
    "none"), where the model's output shape is not held to a task either."""
    labels = dataset.labels
    if labels is None or task == "none":
        return None
    if task == "regression":
        return labels.astype(np.float64)
    if task == "classification" and n_outputs < 2:
        raise ModelError(
            f"a classification model needs one output per class; this one has {n_outputs} "
            'output (use task = "binary" for a detector score, "regression" for a value)'
        )
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise DatasetError(f"{task} labels must be integer class ids, got fractions")
    ids = labels.astype(np.int64)
    top = n_outputs - 1 if task == "classification" else 1
    if ids.min() < 0 or ids.max() > top:
        raise DatasetError(
            f"{task} labels must be class ids in [0, {top}]"
            + (f" for a model with {n_outputs} outputs" if task == "classification" else "")
            + f", got values from {ids.min()} to {ids.max()}"
        )
    return ids


def _in_sequences(dataset: Dataset) -> tuple[NDArray[np.intp], NDArray[np.bool_]]:
    """The row order to run in (each declared sequence together, in file order within
    it, sequences in order of first appearance) and, per row of that order, whether the
    model's state is reset before it (the first row of each sequence). Without declared
    sequences every row is its own sequence."""
    n = len(dataset)
    if dataset.sequences is None:
        return np.arange(n, dtype=np.intp), np.ones(n, dtype=np.bool_)
    ids = dataset.sequences
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first[inverse], kind="stable").astype(np.intp)
    ordered = ids[order]
    resets = np.ones(n, dtype=np.bool_)
    resets[1:] = ordered[1:] != ordered[:-1]
    return order, resets


def _importance_sample(resets: NDArray[np.bool_], limit: int,
                       rng: np.random.Generator) -> NDArray[np.intp]:
    """Rows (positions in run order) for permutation importance: whole sequences drawn
    at random until `limit` rows are reached (all rows when there are fewer)."""
    n = resets.size
    if n <= limit:
        return np.arange(n, dtype=np.intp)
    starts = np.flatnonzero(resets)
    ends = np.append(starts[1:], n)
    chosen: list[int] = []
    for k in rng.permutation(starts.size):
        if len(chosen) >= limit:
            break
        chosen.extend(range(int(starts[k]), int(ends[k])))
    return np.sort(np.asarray(chosen, dtype=np.intp))


def _drift_counts(policy: Policy, names: Sequence[str], sizes: Sequence[int]) -> list[int]:
    """How many values of each output tensor get a drift reference (its first N): all,
    or the policy's `drift_values` of each. Devices histogram at most MAX_OUTPUTS values
    per telemetry window in all, so more is refused here, at validation."""
    counts = [v if policy.drift_values is None else min(policy.drift_values, v)
              for v in sizes]
    if sum(counts) <= MAX_OUTPUTS:
        return counts
    where = f"[models.{policy.model_name}] of the policy"
    if policy.drift_values is None:
        big = max(range(len(sizes)), key=lambda k: sizes[k])
        every = (f" ({' + '.join(f'{v:,}' for v in sizes)} over {len(sizes)} output tensors)"
                 if len(sizes) > 1 else "")
        raise ModelError(
            f"output {names[big]!r} has {sizes[big]:,} values{every}, but devices histogram "
            f"at most {MAX_OUTPUTS} output values per telemetry window (the drift reference "
            f"covers every output tensor): set drift_values = N (1..{MAX_OUTPUTS // len(sizes)})"
            f" in {where} to watch the first N values of each")
    raise ModelError(
        f"drift_values = {policy.drift_values} watches {sum(counts)} values over "
        f"{len(sizes)} output tensors, but devices histogram at most {MAX_OUTPUTS} per "
        f"telemetry window: set drift_values to at most {MAX_OUTPUTS // len(sizes)} in {where}")


def validate(
    model_path: Path, dataset: Dataset, policy: Policy, rng_seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Callable[[float], None] | None = None,
) -> ValidationReport:
    """Run the model over `dataset`, measure, and check the numbers against `policy`.

    Cost: 2 N single-row inferences (baseline, noisy copy) plus IMPORTANCE_REPEATS x
    groups x min(N, importance_rows) for permutation importance, which stops at
    `importance_budget_s`; plus a child-process preflight of the model. `input_shapes`
    are the run shapes of dynamic inputs (as registered). `progress(fraction)` is called
    between steps (the model loaded, the baseline run, the noisy run, each importance
    group, the end); it may raise to stop the run there (a cancelled job).
    """
    step = progress if progress is not None else (lambda fraction: None)
    model_path = Path(model_path)
    try:
        model_bytes = model_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {model_path}: {exc}") from exc
    model = load_model(model_bytes, model_path, input_shapes)
    step(0.05)
    native = dataset.input_dtype == model.inputs[0].dtype and model.inputs[0].dtype[0] in "iu"
    runner = Runner(model, tuple(dataset.inputs.shape[1:]), native=native,
                    output=policy.output, parts=dataset.parts)
    rng = np.random.default_rng(rng_seed)
    order, resets = _in_sequences(dataset)
    x = dataset.inputs[order]
    threshold = policy.threshold if policy.threshold is not None else checks.DEFAULT_THRESHOLD

    for _ in range(_WARMUP_RUNS):
        runner.run_all_rows(x[:1])
    latencies: list[float] = []
    all_outputs = runner.run_all_rows(x, resets, latencies)
    step(0.3)
    outputs = all_outputs[runner.scored]
    n_outputs = int(outputs.shape[1])
    labels = _checked_labels(dataset, policy.task, n_outputs)
    labels = None if labels is None else labels[order]
    groups = None if dataset.groups is None else dataset.groups[order]
    task: Task = policy.task if labels is not None else "none"
    out_specs = model.outputs
    metrics: dict[str, Any] = {
        "rows": len(dataset), "outputs": n_outputs, "task": policy.task,
        "output": out_specs[runner.scored].name,
        "output_tensors": [{"name": o.name, "shape": list(o.shape), "dtype": o.dtype}
                           for o in out_specs],
        # One input: its encoding as text (as before); several: per input name.
        "input_encoding": (runner.encodings() if dataset.parts else
                           next(iter(runner.encodings().values()))),
        "sequences": int(resets.sum()) if dataset.sequences is not None else None,
    }
    if metrics["sequences"] is None:
        del metrics["sequences"]
    if task == "none":
        metrics["mode"] = "metrics_only"
        metrics["quality_skipped"] = (
            'task = "none": quality is not checked' if policy.task == "none" else
            f"the validation data has no labels: quality checks of task {policy.task!r} "
            "skipped (metrics only)")

    # Reference histograms first: the first values of every output tensor, in tensor
    # order, as devices histogram them.
    sizes = [int(values.shape[1]) for values in all_outputs]
    drift_counts = _drift_counts(policy, [o.name for o in out_specs], sizes)
    if drift_counts != sizes:
        metrics["drift_values"] = {"watched": sum(drift_counts), "of": sum(sizes)}
        if len(sizes) > 1:
            metrics["drift_values"]["tensors"] = [
                {"name": o.name, "watched": n, "of": v}
                for o, n, v in zip(out_specs, drift_counts, sizes, strict=True)]
    histograms: list[ReferenceHistogram] = []
    for t, count in enumerate(drift_counts):
        for k in range(count):
            histograms.append(reference_histogram(len(histograms), all_outputs[t][:, k],
                                                  policy.histogram_bins, tensor=t))
    flip_edges = (histograms[0].edges if runner.scored == 0 and histograms
                  else quantile_edges(outputs[:, 0], policy.histogram_bins))

    def run_rows(rows: NDArray[np.float64]) -> NDArray[np.float64]:
        return runner.run_rows(rows, resets)

    # The measurements, in this order: the random generator is shared.
    worst = best = ""
    if labels is not None:
        metrics[checks.metric_name(task)] = checks.score(outputs, labels, task, threshold)
        if task == "binary":
            metrics["binary"] = checks.binary_metrics(outputs, labels, threshold)
        if groups is not None:
            per_group, worst, best = checks.group_metrics(outputs, labels, groups, task,
                                                          threshold)
            name = checks.metric_name(task)
            metrics["groups"] = per_group
            metrics["group_gap"] = abs(per_group[best][name] - per_group[worst][name])
    metrics["noise_std"] = policy.noise_std
    metrics["flip_rate"] = checks.flip_rate(run_rows, x, outputs, flip_edges, task,
                                            policy.noise_std, rng, threshold)
    step(0.5)
    sample = _importance_sample(resets, policy.importance_rows, rng)
    sample_resets = resets[sample].copy()
    sample_resets[0] = True
    sample_resets[1:] |= np.diff(sample) != 1  # a gap in the rows starts a new sequence
    if dataset.parts:  # grouped within each input, the group budget shared among them
        feature_groups, grouping = checks.input_feature_groups(
            [(p.name, p.row_shape, p.start) for p in dataset.parts])
    else:
        feature_groups, grouping = checks.feature_groups(tuple(x.shape[1:]))
    started = time.monotonic()
    importance = checks.permutation_importance(
        lambda rows: runner.run_rows(rows, sample_resets), x[sample], outputs[sample],
        None if labels is None else labels[sample], task, rng, feature_groups,
        started + policy.importance_budget_s, threshold,
        lambda done: step(0.5 + 0.45 * done / max(1, len(feature_groups))))
    metrics["permutation_importance"] = importance
    metrics["importance_basis"] = checks.importance_basis(task, labels is not None)
    metrics["importance_repeats"] = checks.IMPORTANCE_REPEATS
    metrics["importance_rows"] = int(sample.size)
    metrics["importance_grouping"] = grouping
    metrics["importance_seconds"] = time.monotonic() - started
    warnings: list[str] = []
    if len(importance) < len(feature_groups):
        metrics["importance_truncated"] = {"measured": len(importance),
                                           "groups": len(feature_groups)}
        warnings.append(
            f"permutation importance stopped at its budget ({policy.importance_budget_s:g} s): "
            f"{len(importance)} of {len(feature_groups)} feature groups measured")
    # Latency, as measured on the hub (not the device): a sanity bound.
    metrics["latency_ms"] = checks.percentiles(latencies)

    step(1.0)
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
        warnings=([blind] if blind else []) + warnings,
    )

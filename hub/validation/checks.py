"""What validation measures, as pure numpy over model outputs: quality, the metric per
group, the flip rate under input noise, permutation importance, latency percentiles.

The model is reached only through `run_rows` (rows in, outputs out), so these functions
do not depend on the TFLite runtime (`runner.py` supplies it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol import bins
from hub.validation.policy import Task

# Permutation importance averages this many shuffles of each feature.
IMPORTANCE_REPEATS = 3

RunRows = Callable[[NDArray[np.float64]], NDArray[np.float64]]


def metric_name(task: Task) -> str:
    """The quality metric's name for a task: "accuracy" or "mae"."""
    return "accuracy" if task == "classification" else "mae"


def score(outputs: NDArray[np.float64], labels: NDArray[Any], task: Task) -> float:
    """Accuracy (classification) or MAE of the first output (regression)."""
    if task == "classification":
        return float(np.mean(outputs.argmax(axis=1) == labels))
    return float(np.mean(np.abs(outputs[:, 0] - labels)))


def percentiles(latencies: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies)
    p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(lat.mean()), "max": float(lat.max())}


def group_metrics(
    outputs: NDArray[np.float64], labels: NDArray[Any], groups: NDArray[np.str_], task: Task
) -> tuple[dict[str, dict[str, Any]], str, str]:
    """The metric per group, and the worst and the best group by it."""
    name = metric_name(task)
    per_group: dict[str, dict[str, Any]] = {}
    for g in sorted(set(groups.tolist())):
        mask = groups == g
        per_group[g] = {
            "rows": int(mask.sum()),
            name: score(outputs[mask], labels[mask], task),
        }
    ranked = sorted(per_group, key=lambda g: float(per_group[g][name]))
    if task == "classification":
        return per_group, ranked[0], ranked[-1]
    return per_group, ranked[-1], ranked[0]


def flip_rate(
    run_rows: RunRows,
    x: NDArray[np.float64],
    outputs: NDArray[np.float64],
    first_edges: list[float],
    task: Task,
    noise_std: float,
    rng: np.random.Generator,
) -> float:
    """Share of predictions changed by Gaussian noise of `noise_std` x each feature's std.

    A classification prediction changes when its argmax does; a regression one when
    its first output moves to another bin of the first reference histogram
    (`first_edges`, deciles by default), since any float output changes under any noise.
    """
    noise = rng.standard_normal(x.shape) * (noise_std * x.std(axis=0))
    noisy = run_rows(x + noise)
    if task == "classification":
        flips = outputs.argmax(axis=1) != noisy.argmax(axis=1)
    else:
        edges = np.asarray(first_edges)
        flips = bins.bin_index(outputs[:, 0], edges) != bins.bin_index(noisy[:, 0], edges)
    return float(np.mean(flips))


def permutation_importance(
    run_rows: RunRows,
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
    baseline = score(outputs, labels, task) if labels is not None else 0.0
    importance = []
    for j in range(flat.shape[1]):
        changes = []
        for _ in range(IMPORTANCE_REPEATS):
            shuffled = flat.copy()
            shuffled[:, j] = rng.permutation(shuffled[:, j])
            out = run_rows(shuffled.reshape(x.shape))
            if labels is None:
                changes.append(float(np.mean(np.abs(out - outputs))))
            elif task == "classification":
                changes.append(baseline - score(out, labels, task))
            else:
                changes.append(score(out, labels, task) - baseline)
        importance.append(float(np.mean(changes)))
    return importance


def importance_basis(task: Task, has_labels: bool) -> str:
    """What `permutation_importance` measured."""
    if not has_labels:
        return "mean_abs_output_change"
    return "accuracy_drop" if task == "classification" else "mae_rise"

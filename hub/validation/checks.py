"""What validation measures, as pure numpy over model outputs: quality, the metric per
group, the flip rate under input noise, permutation importance, latency percentiles.

The model is reached only through `run_rows` (rows in, outputs out), so these functions
do not depend on the TFLite runtime (`runner.py` supplies it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_agent.protocol import bins
from hub.validation.policy import Task

# Permutation importance averages this many shuffles of each feature group.
IMPORTANCE_REPEATS = 3
# At most this many feature groups: beyond it features are grouped (see feature_groups).
MAX_IMPORTANCE_GROUPS = 128
DEFAULT_THRESHOLD = 0.5  # binary detectors, when the policy sets none

RunRows = Callable[[NDArray[np.float64]], NDArray[np.float64]]


def metric_name(task: Task) -> str:
    """The quality metric's name for a task: "accuracy" (classification; binary, at the
    threshold) or "mae"."""
    return "mae" if task == "regression" else "accuracy"


def detections(outputs: NDArray[np.float64], threshold: float) -> NDArray[np.bool_]:
    """A binary detector's decisions: its score (the output's first value) >= threshold."""
    return np.asarray(outputs[:, 0] >= threshold)


def score(outputs: NDArray[np.float64], labels: NDArray[Any], task: Task,
          threshold: float = DEFAULT_THRESHOLD) -> float:
    """Accuracy (classification: argmax; binary: decision at `threshold`) or MAE of the
    first output (regression)."""
    if task == "classification":
        return float(np.mean(outputs.argmax(axis=1) == labels))
    if task == "binary":
        return float(np.mean(detections(outputs, threshold) == (labels == 1)))
    return float(np.mean(np.abs(outputs[:, 0] - labels)))


def roc_auc(scores: NDArray[np.float64], positive: NDArray[np.bool_]) -> float | None:
    """Area under the ROC curve: the chance a random positive scores above a random
    negative (ties count half), by the rank-sum formula; None with one class only."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_metrics(outputs: NDArray[np.float64], labels: NDArray[Any],
                   threshold: float) -> dict[str, Any]:
    """Precision, recall, false accept rate (FP / negatives), false reject rate
    (FN / positives) at `threshold`, and ROC AUC; a metric the data cannot give (no
    positives, no negatives, no detections) is left out."""
    positive = labels == 1
    detected = detections(outputs, threshold)
    tp = int(np.sum(detected & positive))
    fp = int(np.sum(detected & ~positive))
    fn = int(np.sum(~detected & positive))
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    out: dict[str, Any] = {"threshold": threshold, "positives": n_pos, "negatives": n_neg,
                           "detections": int(detected.sum())}
    if tp + fp:
        out["precision"] = tp / (tp + fp)
    if n_pos:
        out["recall"] = tp / n_pos
        out["frr"] = fn / n_pos
    if n_neg:
        out["far"] = fp / n_neg
    auc = roc_auc(outputs[:, 0], positive)
    if auc is not None:
        out["roc_auc"] = auc
    return out


def percentiles(latencies: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies)
    p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(lat.mean()), "max": float(lat.max())}


def group_metrics(
    outputs: NDArray[np.float64], labels: NDArray[Any], groups: NDArray[np.str_], task: Task,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[dict[str, dict[str, Any]], str, str]:
    """The metric per group, and the worst and the best group by it."""
    name = metric_name(task)
    per_group: dict[str, dict[str, Any]] = {}
    for g in sorted(set(groups.tolist())):
        mask = groups == g
        per_group[g] = {
            "rows": int(mask.sum()),
            name: score(outputs[mask], labels[mask], task, threshold),
        }
    ranked = sorted(per_group, key=lambda g: float(per_group[g][name]))
    if task != "regression":
        return per_group, ranked[0], ranked[-1]
    return per_group, ranked[-1], ranked[0]


def predictions_changed(task: Task, before: NDArray[np.float64], after: NDArray[np.float64],
                        edges: list[float], threshold: float) -> NDArray[np.bool_]:
    """Per row, whether the prediction changed: the argmax (classification), the
    decision (binary), else the bin of the first value among `edges`."""
    if task == "classification":
        return np.asarray(before.argmax(axis=1) != after.argmax(axis=1))
    if task == "binary":
        return np.asarray(detections(before, threshold) != detections(after, threshold))
    e = np.asarray(edges)
    return np.asarray(bins.bin_index(before[:, 0], e) != bins.bin_index(after[:, 0], e))


def flip_rate(
    run_rows: RunRows,
    x: NDArray[np.float64],
    outputs: NDArray[np.float64],
    first_edges: list[float],
    task: Task,
    noise_std: float,
    rng: np.random.Generator,
    threshold: float = DEFAULT_THRESHOLD,
) -> float:
    """Share of predictions changed by Gaussian noise of `noise_std` x each feature's std.

    A classification prediction changes when its argmax does, a binary one when its
    decision at `threshold` does; a regression (or metrics-only) one when its first
    value moves to another bin of `first_edges` (the reference deciles of that value),
    since any float output changes under any noise.
    """
    noise = rng.standard_normal(x.shape) * (noise_std * x.std(axis=0))
    noisy = run_rows(x + noise)
    return float(np.mean(predictions_changed(task, outputs, noisy, first_edges, threshold)))


def feature_groups(row_shape: tuple[int, ...],
                   max_groups: int = MAX_IMPORTANCE_GROUPS) -> tuple[list[NDArray[np.intp]], str]:
    """The flattened feature indexes permuted together, and how they were grouped: one
    feature each when there are at most `max_groups`; else by the last axis (the
    channels of an image, the coefficients of a feature frame) when it is short enough;
    else `max_groups` contiguous blocks of the flattened row."""
    n = int(np.prod(row_shape, dtype=np.int64))
    if n <= max_groups:
        return [np.array([j], dtype=np.intp) for j in range(n)], "feature"
    index = np.arange(n, dtype=np.intp).reshape(row_shape)
    if len(row_shape) >= 2 and row_shape[-1] <= max_groups:
        return ([np.ascontiguousarray(index[..., c]).ravel() for c in range(row_shape[-1])],
                f"last_axis:{row_shape[-1]}")
    return list(np.array_split(np.arange(n, dtype=np.intp), max_groups)), f"blocks:{max_groups}"


def input_feature_groups(inputs: list[tuple[str, tuple[int, ...], int]],
                         max_groups: int = MAX_IMPORTANCE_GROUPS,
                         ) -> tuple[list[NDArray[np.intp]], str]:
    """`feature_groups` for several inputs, each (name, row shape, first column in the
    flattened row): every input is grouped on its own (a group never mixes inputs), with
    an equal share of `max_groups` (at least one group each); the groups are in input
    order and the grouping says each input's, e.g. "in_a=feature:8;in_b=last_axis:3"."""
    share = max(1, max_groups // max(1, len(inputs)))
    groups: list[NDArray[np.intp]] = []
    how: list[str] = []
    for name, row_shape, start in inputs:
        mine, grouping = feature_groups(row_shape, share)
        groups.extend(g + start for g in mine)
        how.append(f"{name}={grouping}:{len(mine)}" if grouping == "feature" else
                   f"{name}={grouping}")
    return groups, ";".join(how)


def permutation_importance(
    run_rows: RunRows,
    x: NDArray[np.float64],
    outputs: NDArray[np.float64],
    labels: NDArray[Any] | None,
    task: Task,
    rng: np.random.Generator,
    groups: list[NDArray[np.intp]] | None = None,
    deadline: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    after_group: Callable[[int], None] | None = None,
) -> list[float]:
    """Per feature group (`feature_groups`; one per flattened feature by default): the
    mean, over IMPORTANCE_REPEATS shuffles of the group's columns across rows (the
    group's values stay together), of the quality drop (accuracy drop / MAE rise) or,
    without labels, of the mean absolute change of the outputs.

    With a `deadline` (time.monotonic()), groups not started by then are left out: the
    list is shorter than the groups. `after_group(groups done)` is called after each
    group (progress; it may raise to stop)."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    if groups is None:
        groups = [np.array([j], dtype=np.intp) for j in range(flat.shape[1])]
    baseline = score(outputs, labels, task, threshold) if labels is not None else 0.0
    importance = []
    for columns in groups:
        if deadline is not None and time.monotonic() > deadline:
            break
        changes = []
        for _ in range(IMPORTANCE_REPEATS):
            shuffled = flat.copy()
            shuffled[:, columns] = flat[rng.permutation(n)][:, columns]
            out = run_rows(shuffled.reshape(x.shape))
            if labels is None:
                changes.append(float(np.mean(np.abs(out - outputs))))
            elif task == "regression":
                changes.append(score(out, labels, task) - baseline)
            else:
                changes.append(baseline - score(out, labels, task, threshold))
        importance.append(float(np.mean(changes)))
        if after_group is not None:
            after_group(len(importance))
    return importance


def importance_basis(task: Task, has_labels: bool) -> str:
    """What `permutation_importance` measured."""
    if not has_labels or task == "none":
        return "mean_abs_output_change"
    return "mae_rise" if task == "regression" else "accuracy_drop"

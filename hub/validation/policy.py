"""The policy a model is held to: `Policy` and `load_policy` (`[default]` overridden by
`[models.<name>]`, every table checked key by key; the file format is in
`hub.validation`'s docstring)."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from edge_agent.protocol import MAX_OUTPUTS
from hub.validation.errors import PolicyError

Task = Literal["classification", "regression", "binary", "none"]
# "binary": a detector's score (the scored output's first value) against `threshold`;
# "none": metrics only (no quality checks; also what any task becomes without labels).
_TASKS: tuple[Task, ...] = ("classification", "regression", "binary", "none")


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
    # binary detectors: score >= threshold is a detection
    threshold: float | None = None
    min_precision: float | None = None
    min_recall: float | None = None
    max_far: float | None = None  # false accept rate: FP / negatives
    max_frr: float | None = None  # false reject rate: FN / positives
    min_roc_auc: float | None = None
    # The output tensor (by name) that quality, flip rate and importance read; the first
    # output when unset.
    output: str | None = None
    # Values of each output tensor (its first N) that get a drift reference (devices
    # histogram at most edge_agent.protocol.MAX_OUTPUTS in all): unset = every value of
    # every output tensor, refused if too many.
    drift_values: int | None = None
    # Permutation importance: rows sampled, and a time budget for the whole measurement.
    importance_rows: int = 256
    importance_budget_s: float = 20.0

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


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _drift_values(key: str, value: Any) -> int:
    n = _integer(1)(key, value)
    if n > MAX_OUTPUTS:
        raise PolicyError(f"{key} must be at most {MAX_OUTPUTS} (devices histogram at most "
                          f"{MAX_OUTPUTS} output values per telemetry window), got {n}")
    return n


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
    "threshold": _number(-math.inf),
    "min_precision": _number(0.0, 1.0),
    "min_recall": _number(0.0, 1.0),
    "max_far": _number(0.0, 1.0),
    "max_frr": _number(0.0, 1.0),
    "min_roc_auc": _number(0.0, 1.0),
    "output": _text,
    "drift_values": _drift_values,
    "importance_rows": _integer(1),
    "importance_budget_s": _number(0.0),
}
# Thresholds that only make sense for one task.
_TASK_ONLY = {"min_accuracy": "classification", "max_mae": "regression",
              **{k: "binary" for k in ("threshold", "min_precision", "min_recall", "max_far",
                                       "max_frr", "min_roc_auc")}}


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
            f"{path}: no task for model {model_name!r}; set task = one of {list(_TASKS)} "
            f"in [default] or [models.{model_name}]"
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

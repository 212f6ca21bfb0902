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

from hub.validation.errors import PolicyError

Task = Literal["classification", "regression"]
_TASKS: tuple[Task, ...] = ("classification", "regression")


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

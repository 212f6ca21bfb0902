"""Rollouts (pure): targeting, wave membership, policy, states, and the controller's
decisions. No I/O: the controller (rollout_controller.py) reads state, calls `decide`,
and appends what it returns as ledger events.

Selectors (comma = AND):  `all` | `group=G` | `tag:K=V` | `device=ID[|ID...]`
Waves: cumulative shares or counts, e.g. `1%,10%,50%,100%` or `5,20,100%`; the last
wave must reach every target (`100%` or `all`).

Wave membership is deterministic: targets are ordered by
BLAKE3("fleetledger/wave\\0" || rollout id || "\\0" || device id) and cut at the
cumulative counts, so anyone can recompute it from the `rollout.created` event.

    rollout: created -> running <-> paused;  running -> halted | completed
             created | running | paused | halted -> aborted
             running | paused | halted | completed | aborted -> rolled_back
    wave:    pending -> rolling -> baking -> done;  rolling | baking -> halted
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import blake3

from hub.errors import Refused

CREATED: Final = "created"
RUNNING: Final = "running"
PAUSED: Final = "paused"
HALTED: Final = "halted"
COMPLETED: Final = "completed"
ABORTED: Final = "aborted"
ROLLED_BACK: Final = "rolled_back"
ACTIVE_STATES: Final = (CREATED, RUNNING, PAUSED, HALTED)

WAVE_PENDING: Final = "pending"
WAVE_ROLLING: Final = "rolling"
WAVE_BAKING: Final = "baking"
WAVE_DONE: Final = "done"
WAVE_HALTED: Final = "halted"

# A device's state within one rollout.
DEV_PLANNED: Final = "planned"  # in a wave that has not started
DEV_ASSIGNED: Final = "assigned"  # assignment issued, no outcome yet
DEV_APPLIED: Final = "applied"
DEV_FAILED: Final = "failed"
DEV_REVERTED: Final = "reverted"  # installed, then the agent's health window reverted it
DEV_TIMED_OUT: Final = "timed_out"  # no outcome before the deadline: counts as failed
DEV_ROLLED_BACK: Final = "rolled_back"  # given the previous release again
DEV_REVOKED: Final = "revoked"  # revoked before its outcome: out of the rollout
FAILED_STATES: Final = (DEV_FAILED, DEV_REVERTED, DEV_TIMED_OUT)

ALLOWED_FROM: Final[dict[str, tuple[str, ...]]] = {
    "start": (CREATED,),
    "pause": (RUNNING,),
    "resume": (PAUSED,),
    "abort": (CREATED, RUNNING, PAUSED, HALTED),
    # After an abort the devices that took the new release keep it: rollback gives
    # them their previous one.
    "rollback": (RUNNING, PAUSED, HALTED, COMPLETED, ABORTED),
}

_WAVE_DOMAIN: Final = b"fleetledger/wave\x00"
_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_TAG_KEY_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TAG_VALUE_RE: Final = re.compile(r"^[A-Za-z0-9_.:/-]{0,128}$")


class RolloutError(Refused, ValueError):
    """Bad rollout input or a transition that is not allowed; the message says why."""


# ---------------------------------------------------------------- targeting


def check_tag(key: str, value: str) -> None:
    if not _TAG_KEY_RE.fullmatch(key):
        raise RolloutError(f"invalid tag key {key!r}: 1-64 letters, digits, '_', '.', '-'")
    if not _TAG_VALUE_RE.fullmatch(value):
        raise RolloutError(f"invalid tag value {value!r}: letters, digits and _.:/- only")


def check_group(group: str) -> None:
    if group and not _TAG_KEY_RE.fullmatch(group):
        raise RolloutError(f"invalid group {group!r}: 1-64 letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets; every clause must hold."""

    text: str
    group: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] = ()

    def matches(self, device: str, group: str, tags: Mapping[str, str]) -> bool:
        if self.group is not None and group != self.group:
            return False
        if any(tags.get(k) != v for k, v in self.tags):
            return False
        return not self.devices or device in self.devices


def parse_selector(text: str) -> Selector:
    clauses = [c.strip() for c in text.split(",") if c.strip()]
    if not clauses:
        raise RolloutError("empty target: use `all`, `group=G`, `tag:K=V` or `device=ID`")
    group: str | None = None
    tags: list[tuple[str, str]] = []
    devices: tuple[str, ...] = ()
    for clause in clauses:
        if clause == "all":
            continue
        if clause.startswith("group="):
            group = clause[len("group="):]
            check_group(group)
            if not group:
                raise RolloutError("group= needs a name")
        elif clause.startswith("tag:") and "=" in clause:
            key, _, value = clause[len("tag:"):].partition("=")
            check_tag(key, value)
            tags.append((key, value))
        elif clause.startswith("device="):
            devices = tuple(sorted(d for d in clause[len("device="):].split("|") if d))
            if not devices:
                raise RolloutError("device= needs at least one id")
        else:
            raise RolloutError(
                f"unknown target clause {clause!r}: use `all`, `group=G`, `tag:K=V` or "
                "`device=ID|ID`, joined by commas"
            )
    canonical = ",".join(
        [*([f"group={group}"] if group is not None else []),
         *(f"tag:{k}={v}" for k, v in sorted(tags)),
         *([f"device={'|'.join(devices)}"] if devices else [])]
    ) or "all"
    return Selector(canonical, group, tuple(sorted(tags)), devices)


def label_clauses(text: str) -> str:
    """Label selector `group=prod,site=a` (comma = AND; `group` is the device's group,
    any other key a tag) as target clauses: `group=prod,tag:site=a`."""
    clauses = []
    for item in (c.strip() for c in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RolloutError(f"invalid label {item!r}: use KEY=VALUE, e.g. group=prod,site=a")
        key, value = key.strip(), value.strip()
        clauses.append(f"group={value}" if key == "group" else f"tag:{key}={value}")
    if not clauses:
        raise RolloutError("empty label selector: use KEY=VALUE, e.g. group=prod,site=a")
    return ",".join(clauses)


# ---------------------------------------------------------------- waves


def parse_waves(text: str | Sequence[str]) -> list[str]:
    """Wave specs in canonical form (`N%` or `N`); the last one must reach all targets."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items:
        raise RolloutError("no waves given: e.g. --waves 1%,10%,50%,100%")
    out: list[str] = []
    for item in items:
        if item == "all":
            out.append("100%")
            continue
        try:
            if item.endswith("%"):
                pct = float(item[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                out.append(f"{pct:g}%")
            else:
                count = int(item)
                if count < 1:
                    raise ValueError
                out.append(str(count))
        except ValueError:
            raise RolloutError(
                f"invalid wave {item!r}: use a share (10%) or a device count (5)"
            ) from None
    if out[-1] != "100%":
        raise RolloutError("the last wave must be 100% (or `all`): every target gets it")
    return out


def wave_counts(waves: Sequence[str], n: int) -> list[int]:
    """Cumulative device counts per wave for `n` targets; empty waves are dropped, and
    every kept wave adds at least one device."""
    cumulative: list[int] = []
    for spec in waves:
        share = spec.endswith("%")
        want = math.ceil(float(spec[:-1]) / 100.0 * n - 1e-9) if share else int(spec)
        want = min(max(want, 1), n)
        if not cumulative or want > cumulative[-1]:
            cumulative.append(want)
    return cumulative


def wave_order(rollout: str, devices: Sequence[str]) -> list[str]:
    def key(device: str) -> bytes:
        return blake3.blake3(
            _WAVE_DOMAIN + rollout.encode() + b"\x00" + device.encode()
        ).digest()

    return sorted(devices, key=key)


def split_waves(rollout: str, devices: Sequence[str], waves: Sequence[str]) -> list[list[str]]:
    """The devices of each wave, deterministically (see the module docstring)."""
    ordered = wave_order(rollout, sorted(set(devices)))
    out: list[list[str]] = []
    start = 0
    for end in wave_counts(waves, len(ordered)):
        out.append(ordered[start:end])
        start = end
    return out


def parse_duration(text: str | float | int) -> float:
    """Seconds from `90`, `1.5s`, `500ms`, `10m`, `2h`."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise RolloutError("durations must not be negative")
        return float(text)
    match = _DURATION_RE.fullmatch(str(text))
    if not match:
        raise RolloutError(f"invalid duration {text!r}: e.g. 500ms, 60s, 10m, 2h")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]


# ---------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    min_success: float = 0.95
    max_failure: float = 0.05
    bake_s: float = 0.0
    max_error_rate: float | None = None
    max_p95_ms: float | None = None
    max_psi: float | None = None
    deadline_s: float = 600.0
    auto_rollback: bool = False
    min_inferences: int = 50  # telemetry gates judge only with at least this many

    def __post_init__(self) -> None:
        for name in ("min_success", "max_failure"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RolloutError(f"{name} must be between 0 and 1, got {value}")
        for name in ("max_error_rate", "max_p95_ms", "max_psi"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise RolloutError(f"{name} must not be negative")
        if self.bake_s < 0 or self.deadline_s <= 0:
            raise RolloutError("bake must be >= 0 and deadline > 0")
        if self.min_inferences < 1:
            raise RolloutError("min_inferences must be at least 1")

    @property
    def has_gates(self) -> bool:
        return any(v is not None for v in (self.max_error_rate, self.max_p95_ms, self.max_psi))

    def to_payload(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Policy:
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise RolloutError(f"invalid rollout policy: {exc}") from exc


def check_transition(action: str, state: str, rollout: str) -> None:
    if state in ALLOWED_FROM.get(action, ()):
        return
    allowed = [a for a, sources in ALLOWED_FROM.items() if state in sources]
    hint = (f"allowed now: {', '.join(allowed)}" if allowed
            else "nothing more can happen to it")
    raise RolloutError(f"cannot {action} rollout {rollout}: it is {state}; {hint}")


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class WaveView:
    index: int
    state: str
    devices: Mapping[str, str]  # device -> DEV_* state
    started_ns: int = 0
    baking_ns: int = 0

    @property
    def live(self) -> tuple[str, ...]:
        """The wave's devices that count: not those revoked since it was planned."""
        return tuple(sorted(d for d, s in self.devices.items() if s != DEV_REVOKED))

    def counts(self) -> dict[str, int]:
        return wave_tally(Counter(self.devices.values()))


def wave_tally(states: Mapping[str, int]) -> dict[str, int]:
    """A wave's tally from how many of its devices are in each DEV_* state (revoked ones
    do not count): what `rollout status` and the dashboard show."""
    def n(*names: str) -> int:
        return sum(states.get(s, 0) for s in names)

    return {"devices": sum(states.values()) - n(DEV_REVOKED), "applied": n(DEV_APPLIED),
            "failed": n(*FAILED_STATES), "pending": n(DEV_ASSIGNED, DEV_PLANNED),
            "timed_out": n(DEV_TIMED_OUT), "reverted": n(DEV_REVERTED)}


@dataclass(frozen=True)
class TelemetryView:
    """Telemetry of the rollout's new release on its devices so far."""

    inferences: int = 0
    errors: int = 0
    p95_ms: float | None = None
    psi: float | None = None  # the largest PSI over the outputs
    psi_per_output: tuple[float, ...] = ()
    observed: int = 0  # output samples behind the PSI

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"inferences": self.inferences, "errors": self.errors,
                               "error_rate": _round(self.error_rate)}
        if self.p95_ms is not None:
            out["p95_ms"] = _round(self.p95_ms)
        if self.psi is not None:
            out["psi"] = _round(self.psi)
            out["psi_per_output"] = [_round(v) for v in self.psi_per_output]
        return out

    @property
    def error_rate(self) -> float:
        return self.errors / self.inferences if self.inferences else 0.0


@dataclass(frozen=True)
class Decision:
    action: str  # see the ACT_* names
    wave: int = -1
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    devices: tuple[str, ...] = ()


ACT_NONE: Final = "none"
ACT_START_WAVE: Final = "start_wave"
ACT_TIME_OUT: Final = "time_out"
ACT_BAKE: Final = "bake"
ACT_COMPLETE_WAVE: Final = "complete_wave"
ACT_HALT: Final = "halt"
ACT_COMPLETE: Final = "complete"


def _round(value: float) -> float:
    return round(float(value), 6)


def gate_failure(policy: Policy, t: TelemetryView) -> str | None:
    """The first telemetry gate that trips, as a sentence; None while they hold or
    while there is too little telemetry to judge."""
    if t.inferences < policy.min_inferences:
        return None
    if policy.max_error_rate is not None and t.error_rate > policy.max_error_rate:
        return (f"error rate {t.error_rate:.4f} above {policy.max_error_rate:g} "
                f"({t.errors} of {t.inferences} inferences)")
    if policy.max_p95_ms is not None and t.p95_ms is not None and t.p95_ms > policy.max_p95_ms:
        return f"p95 latency {t.p95_ms:.3f} ms above {policy.max_p95_ms:g} ms"
    if policy.max_psi is not None and t.psi is not None and t.psi > policy.max_psi:
        return f"output drift PSI {t.psi:.4f} above {policy.max_psi:g}"
    return None


def decide(policy: Policy, waves: Sequence[WaveView], telemetry: TelemetryView,
           now_ns: int) -> Decision:
    """The next step of a running rollout (one step per call; the caller loops)."""
    current = next((w for w in waves if w.state != WAVE_DONE), None)
    if current is None:
        total = [w.counts() for w in waves]
        return Decision(ACT_COMPLETE, evidence={
            "devices": sum(c["devices"] for c in total),
            "applied": sum(c["applied"] for c in total),
            "failed": sum(c["failed"] for c in total), **telemetry.evidence()})
    if current.state == WAVE_HALTED:
        return Decision(ACT_NONE, current.index)
    if current.state == WAVE_PENDING:
        return Decision(ACT_START_WAVE, current.index, devices=current.live)
    counts = current.counts()
    if not counts["devices"]:
        return Decision(ACT_COMPLETE_WAVE, current.index,
                        "every device of the wave was revoked", counts)
    n = counts["devices"]
    success = counts["applied"] / n
    failure = counts["failed"] / n
    deadline_ns = current.started_ns + int(policy.deadline_s * 1e9)
    evidence = {**counts, "success_rate": _round(success), "failure_rate": _round(failure),
                "min_success": policy.min_success, "max_failure": policy.max_failure,
                **telemetry.evidence()}
    late = tuple(sorted(d for d, s in current.devices.items() if s == DEV_ASSIGNED))
    if late and now_ns >= deadline_ns:
        return Decision(ACT_TIME_OUT, current.index,
                        f"{len(late)} device(s) did not report within {policy.deadline_s:g} s",
                        evidence, late)
    if failure > policy.max_failure:
        return Decision(ACT_HALT, current.index,
                        f"failure rate {failure:.4f} above {policy.max_failure:g} "
                        f"({counts['failed']} of {counts['devices']} devices)", evidence)
    tripped = gate_failure(policy, telemetry)
    if tripped is not None:
        return Decision(ACT_HALT, current.index, tripped, evidence)
    if success < policy.min_success:
        if counts["pending"] == 0:
            return Decision(ACT_HALT, current.index,
                            f"success rate {success:.4f} below {policy.min_success:g} with "
                            "every device reported", evidence)
        return Decision(ACT_NONE, current.index)
    # Success threshold met: bake, then complete the wave while the gates hold.
    if current.state == WAVE_ROLLING and policy.bake_s > 0:
        return Decision(ACT_BAKE, current.index, f"bake {policy.bake_s:g} s", evidence)
    baked_since = current.baking_ns if current.state == WAVE_BAKING else now_ns
    if now_ns < baked_since + int(policy.bake_s * 1e9):
        return Decision(ACT_NONE, current.index)
    short = policy.has_gates and telemetry.inferences < policy.min_inferences
    no_psi = policy.max_psi is not None and telemetry.psi is None
    if short or no_psi:
        if now_ns >= deadline_ns:
            need = (f"{telemetry.inferences} inferences reported (need "
                    f"{policy.min_inferences})" if short
                    else f"{telemetry.observed} output samples reported, too few for PSI")
            return Decision(ACT_HALT, current.index,
                            f"only {need} to judge the telemetry gates before the deadline",
                            evidence)
        return Decision(ACT_NONE, current.index)
    return Decision(ACT_COMPLETE_WAVE, current.index, "thresholds met", evidence)

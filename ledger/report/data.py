"""What the audit report shows, gathered from the ledger alone.

Entries come from a Source of ledger/storage/at.py (a database or an export file); the
operator and device signatures are checked with the functions `ledger at` uses
(`check_command`, `check_report`), and the device at a time with `answer_at`. Each
claim keeps the seq of the entry it rests on; every such entry is `cited`, and the
report's appendix lists them with their hashes. Nothing here writes HTML: values stay
plain Python values, and render.py escapes them.

The event kinds and payload fields are those of docs/PROTOCOL.md ("Event catalog").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ledger.entry import Entry
from ledger.storage.at import (
    Check,
    Source,
    answer_at,
    check_command,
    check_report,
    operator_name,
)

MODEL_KINDS = ("model.registered", "model.validated", "model.approved", "model.rejected",
               "model.released", "model.deprecated", "model.revoked", "model.resigned",
               "model.reference_rebased")
ROLLOUT_KINDS = ("rollout.created", "rollout.started", "rollout.resumed", "rollout.paused",
                 "rollout.aborted", "rollout.wave_started", "rollout.devices_timed_out",
                 "rollout.wave_baking", "rollout.wave_completed", "rollout.halted",
                 "rollout.completed", "rollout.device_added", "rollout.rolled_back")
DEVICE_KINDS = ("device.enrolled", "device.revoked", "device.assigned",
                "device.update_applied", "device.update_failed", "device.update_reverted",
                "device.tagged")
# The operator verb whose signed command each event keeps (docs/PROTOCOL.md).
VERB_OF = {"model.registered": "model.register", "model.validated": "model.validate",
           "model.approved": "model.approve", "model.rejected": "model.reject",
           "model.released": "model.release", "model.deprecated": "model.deprecate",
           "model.revoked": "model.revoke", "model.reference_rebased": "model.rebase",
           "rollout.created": "rollout.create",
           "rollout.started": "rollout.start", "rollout.resumed": "rollout.resume",
           "rollout.paused": "rollout.pause", "rollout.aborted": "rollout.abort"}
GATES = (("error_rate", "max_error_rate", "error rate"), ("p95_ms", "max_p95_ms", "p95 (ms)"),
         ("psi", "max_psi", "PSI"))


def utc(ts_ns: int) -> str:
    stamp = datetime.fromtimestamp(ts_ns // 1_000_000_000, tz=UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def show(value: Any) -> str:
    """A payload value as text: floats to 6 significant digits, bytes as hex (cut),
    maps and lists as JSON."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return value.hex() if len(value) <= 32 else f"{value[:16].hex()}… ({len(value)} bytes)"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=show, ensure_ascii=False)
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Step:
    """An event and who did it: `by` is the operator's name, `signature` valid, INVALID
    (with the problem) or unchecked (the hub's own event)."""

    seq: int
    time: str
    kind: str
    by: str
    signature: str
    problem: str = ""
    note: str = ""


@dataclass
class ModelVersion:
    name: str
    version: str
    digest: str = ""
    follows: str = ""  # the version of the same name registered before it
    lineage: list[tuple[str, str]] = field(default_factory=list)
    card: list[tuple[str, str]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    passed: bool | None = None
    metrics: list[tuple[str, str]] = field(default_factory=list)
    policy: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    validated_seq: int | None = None
    approvals_required: str = ""
    approvals: list[Step] = field(default_factory=list)
    released_seq: int | None = None
    manifest_hash: str = ""
    expires: str = ""
    status: str = "registered"


@dataclass
class Wave:
    index: int
    size: int
    started_seq: int | None = None
    outcome: str = "planned"  # planned, started, baking, completed, halted
    outcome_seq: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    id: str
    model: str
    version: str
    target: str
    policy: list[tuple[str, str]]
    gates: dict[str, float]  # evidence key -> its threshold
    created: Step
    waves: list[Wave] = field(default_factory=list)
    decisions: list[Step] = field(default_factory=list)
    state: str = "created"


@dataclass(frozen=True)
class Span:
    """What ran on a device from `start` to `end` (ledger time, ns), said by entry seq."""

    start: int
    end: int
    label: str
    seq: int


@dataclass
class DeviceHistory:
    device: str
    start_ns: int
    end_ns: int
    at_start: str = ""  # model/version running at start_ns ("" when nothing)
    at_start_seq: int | None = None
    at_end: str = ""
    at_end_seq: int | None = None
    approved_by: list[str] = field(default_factory=list)  # of what ran at the end
    events: list[Step] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)


@dataclass(frozen=True)
class Verification:
    """The verdict of `ledger verify` (ledger/cli/audit.py), shown as it is."""

    ok: bool
    lines: list[str]
    doc: dict[str, Any]

    @property
    def first_bad_seq(self) -> int | None:
        seq = self.doc.get("first_bad_seq")
        return seq if isinstance(seq, int) else None


@dataclass
class ReportData:
    source: str
    generated: str
    verification: Verification
    # (name, key id, roles, seq of operator.added)
    operators: list[tuple[str, str, str, int]] = field(default_factory=list)
    models: list[ModelVersion] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    devices: list[DeviceHistory] = field(default_factory=list)
    fleet: list[tuple[str, int]] = field(default_factory=list)  # model/version -> devices
    checks: list[Check] = field(default_factory=list)
    cited: dict[int, Entry] = field(default_factory=dict)
    problem: str = ""  # why some sections could not be read

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def appendix(self) -> list[Entry]:
        return [self.cited[s] for s in sorted(self.cited)]


def gather(source: Source, verification: Verification, where: str, devices: list[str],
           start_ns: int, end_ns: int, now_ns: int) -> ReportData:
    """Everything the report shows, from `source`."""
    data = ReportData(where, utc(now_ns), verification)
    operators = {str(op.payload.get("keyid", "")): op for op in source.select(("operator.added",))}
    for keyid, op in operators.items():
        data.operators.append((str(op.payload.get("name", "")), keyid,
                               show(op.payload.get("roles", [])), op.seq))
        data.cited[op.seq] = op
    gatherer = _Gatherer(source, data, operators)
    gatherer.models()
    gatherer.rollouts()
    gatherer.fleet()
    for device in devices:
        gatherer.device(device, start_ns, end_ns)
    return data


class _Gatherer:
    def __init__(self, source: Source, data: ReportData, operators: dict[str, Entry]) -> None:
        self.source, self.data, self.operators = source, data, operators

    def step(self, e: Entry, note: str = "") -> Step:
        """The event as a step, its operator signature checked when it keeps one."""
        self.data.cited[e.seq] = e
        verb = VERB_OF.get(e.kind)
        if verb is None or "command" not in e.payload:
            return Step(e.seq, utc(e.ts), e.kind, operator_name(self.operators, e.actor),
                        "unchecked", note=note)
        check = check_command(e, verb, self.operators)
        self.data.checks.append(check)
        return Step(e.seq, utc(e.ts), e.kind, check.signer,
                    "valid" if check.ok else "INVALID", check.problem, note)

    def models(self) -> None:
        found: dict[str, ModelVersion] = {}
        last_of_name: dict[str, str] = {}
        for e in self.source.select(MODEL_KINDS):
            p = e.payload
            name, version = str(p.get("name", "")), str(p.get("version", ""))
            key = f"{name}/{version}"
            m = found.get(key)
            if m is None:
                m = found[key] = ModelVersion(name, version, follows=last_of_name.get(name, ""))
                last_of_name[name] = key
            note = show(p.get("reason", ""))
            m.steps.append(self.step(e, note))
            if e.kind == "model.registered":
                m.digest = show(p.get("digest"))
                m.lineage = _items(p.get("lineage"))
                m.card = _items(p.get("card"))
            elif e.kind == "model.validated":
                m.passed = bool(p.get("passed"))
                m.metrics = _items(p.get("metrics"))
                m.policy = _items(p.get("policy"))
                m.failures = [show(f) for f in p.get("failures") or []]
                m.validated_seq = e.seq
                m.approvals_required = show(p.get("approvals_required"))
            elif e.kind == "model.approved":
                m.approvals.append(m.steps[-1])
            elif e.kind in ("model.released", "model.resigned"):
                m.released_seq = e.seq
                m.manifest_hash = show(p.get("manifest_hash"))
                m.expires = show(p.get("expires"))
            m.status = e.kind.split(".", 1)[1]
        self.data.models = list(found.values())

    def rollouts(self) -> None:
        by_id: dict[str, Rollout] = {}
        for e in self.source.select(ROLLOUT_KINDS):
            p = e.payload
            rid = str(p.get("rollout", e.subject.removeprefix("rollout:")))
            if e.kind == "rollout.created":
                policy = p.get("policy") if isinstance(p.get("policy"), dict) else {}
                assert isinstance(policy, dict)
                sizes = [int(n) for n in p.get("wave_sizes") or [] if isinstance(n, int)]
                by_id[rid] = Rollout(
                    rid, show(p.get("model")), show(p.get("version")), show(p.get("target")),
                    _items(policy), {key: float(policy[limit]) for key, limit, _ in GATES
                                     if isinstance(policy.get(limit), int | float)},
                    self.step(e), [Wave(i, n) for i, n in enumerate(sizes)])
                continue
            r = by_id.get(rid)
            if r is None:
                continue
            wave = p.get("wave")
            w = r.waves[wave] if isinstance(wave, int) and 0 <= wave < len(r.waves) else None
            outcome = {"rollout.wave_started": "started", "rollout.wave_baking": "baking",
                       "rollout.wave_completed": "completed",
                       "rollout.halted": "halted"}.get(e.kind)
            if w is not None and outcome is not None:
                w.outcome = outcome
                if outcome == "started":
                    w.started_seq = e.seq
                else:
                    w.outcome_seq = e.seq
                if isinstance(p.get("evidence"), dict):
                    w.evidence = p["evidence"]
            detail = [f"wave {wave}" if isinstance(wave, int) else "",
                      show(p.get("reason", "")), _evidence_text(p.get("evidence"))]
            r.decisions.append(self.step(e, "; ".join(d for d in detail if d)))
            r.state = e.kind.split(".", 1)[1]
        self.data.rollouts = list(by_id.values())

    def fleet(self) -> None:
        """Devices by the model/version they last reported applied (or reverted to)."""
        running: dict[str, str] = {}
        for e in self.source.select(("device.update_applied", "device.update_reverted")):
            p = e.payload
            running[e.subject] = f"{show(p.get('model'))}/{show(p.get('version'))}"
        counts: dict[str, int] = {}
        for label in running.values():
            counts[label] = counts.get(label, 0) + 1
        self.data.fleet = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def device(self, device: str, start_ns: int, end_ns: int) -> None:
        entries = self.source.select(DEVICE_KINDS, f"device:{device}")
        if start_ns == 0 and entries:  # no --from: from the device's first entry
            start_ns = min(entries[0].ts, end_ns)
        h = DeviceHistory(device, start_ns, end_ns)
        first = answer_at(self.source, device, start_ns)
        last = answer_at(self.source, device, end_ns)
        for answer, which in ((first, "start"), (last, "end")):
            if answer.applied is not None:
                p = answer.applied.payload
                label = f"{show(p.get('model'))}/{show(p.get('version'))}"
                setattr(h, f"at_{which}", label)
                setattr(h, f"at_{which}_seq", answer.applied.seq)
                for e in answer.entries():
                    self.data.cited[e.seq] = e
        h.approved_by = [last.name_of(e.actor) for e in last.approvals]
        self.data.checks += [c for c in last.checks if c not in self.data.checks]
        enrolled: Entry | None = None
        current = (h.at_start, h.at_start_seq, start_ns)
        for e in entries:
            if e.kind == "device.enrolled":
                enrolled = e
            if not start_ns <= e.ts <= end_ns:
                continue
            p = e.payload
            label = f"{show(p.get('model'))}/{show(p.get('version'))}" if "model" in p else ""
            note = "; ".join(x for x in (label, show(p.get("reason", ""))) if x)
            if e.kind == "device.update_applied":
                check = check_report(e, enrolled)
                self.data.checks.append(check)
                h.events.append(Step(e.seq, utc(e.ts), e.kind, check.signer,
                                     "valid" if check.ok else "INVALID", check.problem, note))
                self.data.cited[e.seq] = e
            else:
                h.events.append(self.step(e, note))
            if e.kind in ("device.update_applied", "device.update_reverted"):
                if current[0]:
                    h.spans.append(Span(current[2], e.ts, current[0], current[1] or 0))
                current = (label, e.seq, e.ts)
        if current[0]:
            h.spans.append(Span(current[2], end_ns, current[0], current[1] or 0))
        self.data.devices.append(h)


def _items(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        return []
    return [(str(k), show(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]


def _evidence_text(evidence: Any) -> str:
    if not isinstance(evidence, dict):
        return ""
    keys = ("applied", "failed", "devices", "error_rate", "p95_ms", "psi")
    return ", ".join(f"{k} {show(evidence[k])}" for k in keys if k in evidence)

"""The auditor's answer: which model ran on a device at a time, and who vouched for it.

`answer_at(source, device, t_ns)` reads the ledger alone (never the hub's tables) and
returns the release the device last reported `applied` at or before `t_ns` (ledger
time: the entry's ts), the assignment it came from, the rollout, who registered,
validated, approved and released that version (operator names from `operator.added`),
the validation numbers, and every signature it can check offline:

* each operator command kept in an event (`command`, a signed envelope over the
  `operator-command` domain) against the key the ledger recorded for its actor in
  `operator.added`, and that it was signed for that verb and model version;
* the device's own status report (`report`, domain `device-report`) against the key
  of its `device.enrolled` event, and that it says what the event says.

The event kinds and envelope layout are those of docs/PROTOCOL.md ("Event catalog",
"Wire protocol"); they are re-read here generically because the ledger package must
not import the hub or the device. Entries come from a `Source`: a database
(`StoreSource`) or an export file (`ExportSource`); both also make proof bundles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ledger.bundle import BUNDLE_FORMAT
from ledger.checkpoint import Checkpoint
from ledger.encoding import canonical_decode, canonical_encode
from ledger.entry import Entry
from ledger.errors import BundleError, EncodingError
from ledger.merkle import HASHES, reference_inclusion_proof
from ledger.note import parse_note
from ledger.signing import PublicKey

DOMAIN_COMMAND = "operator-command"
DOMAIN_DEVICE_REPORT = "device-report"
REPORT_KINDS = ("device.update_applied", "device.update_failed", "device.update_reverted")


class Source(Protocol):
    """Where the entries come from."""

    def select(self, kinds: Sequence[str], subject: str | None = None) -> list[Entry]:
        """Entries of one of `kinds` (and of exactly `subject`, if given), in seq order."""

    def bundle(self, seq: int) -> bytes:
        """The proof bundle of entry `seq` at the newest checkpoint (BundleError if none
        covers it)."""


@dataclass(frozen=True)
class Check:
    """One signature checked: what was signed, by whom, and the outcome."""

    what: str  # e.g. "model.approved seq 12"
    signer: str  # an operator's name, a device id, or a key id when unknown
    ok: bool
    problem: str = ""


@dataclass
class Answer:
    device: str
    t_ns: int
    applied: Entry | None = None
    later: Entry | None = None  # the first report after `applied` that changed the model
    assignment: Entry | None = None
    rollout_id: str = ""
    rollout: Entry | None = None
    enrolled: Entry | None = None
    registered: Entry | None = None
    validated: Entry | None = None
    approvals: list[Entry] = field(default_factory=list)
    released: Entry | None = None
    operators: dict[str, Entry] = field(default_factory=dict)  # keyid -> operator.added
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def name_of(self, keyid: str) -> str:
        return operator_name(self.operators, keyid)

    def entries(self) -> list[Entry]:
        """Every entry the answer rests on, in seq order (the ones to bundle)."""
        found = [self.applied, self.later, self.assignment, self.rollout, self.enrolled,
                 self.registered, self.validated, *self.approvals, self.released]
        signers = {e.actor for e in found if e is not None}
        found += [op for keyid, op in self.operators.items() if keyid in signers]
        return sorted({e.seq: e for e in found if e is not None}.values(), key=lambda e: e.seq)


def answer_at(source: Source, device: str, t_ns: int) -> Answer:
    """What ran on `device` at ledger time `t_ns`, and the evidence for it."""
    answer = Answer(device, t_ns)
    reports = source.select(REPORT_KINDS, f"device:{device}")
    applied = [e for e in reports if e.kind == REPORT_KINDS[0] and e.ts <= t_ns]
    if not applied:
        return answer
    answer.applied = report = applied[-1]
    p = report.payload
    model, version = str(p.get("model", "")), str(p.get("version", ""))
    answer.later = next((e for e in reports if e.seq > report.seq and (
        e.kind == "device.update_reverted" or (e.kind == REPORT_KINDS[0] and (
            e.payload.get("model"), e.payload.get("version")) != (model, version)))), None)
    for op in source.select(("operator.added",)):
        answer.operators[str(op.payload.get("keyid", ""))] = op

    subject = f"device:{device}"
    enrolled = [e for e in source.select(("device.enrolled",), subject) if e.seq < report.seq]
    answer.enrolled = enrolled[-1] if enrolled else None
    answer.checks.append(check_report(report, answer.enrolled))

    assigned = [e for e in source.select(("device.assigned",), subject)
                if e.seq < report.seq and e.payload.get("counter") == p.get("counter")]
    if assigned:
        answer.assignment = assigned[-1]
        answer.rollout_id = _assignment_rollout(assigned[-1].payload)
        if answer.rollout_id:
            created = source.select(("rollout.created",), f"rollout:{answer.rollout_id}")
            answer.rollout = created[0] if created else None

    model_events = source.select(("model.registered", "model.validated", "model.approved",
                                  "model.released"), f"model:{model}/{version}")
    before = [e for e in model_events if e.seq < report.seq]
    answer.registered = _last(before, "model.registered")
    answer.validated = _last(before, "model.validated")
    answer.released = _last(before, "model.released")
    answer.approvals = [e for e in before if e.kind == "model.approved"]
    for entry, verb in ((answer.registered, "model.register"),
                        (answer.validated, "model.validate"),
                        *((e, "model.approve") for e in answer.approvals),
                        (answer.released, "model.release"),
                        (answer.rollout, "rollout.create")):
        if entry is not None:
            answer.checks.append(check_command(entry, verb, answer.operators))
    return answer


def _last(entries: list[Entry], kind: str) -> Entry | None:
    found = [e for e in entries if e.kind == kind]
    return found[-1] if found else None


def _envelope(data: Any) -> tuple[bytes, dict[str, bytes], dict[str, Any]]:
    """(signed bytes, keyid -> signature, signed document) of a signed envelope
    {"signatures": [{"keyid", "sig"}], "signed": bin}; ValueError if it is not one."""
    if not isinstance(data, bytes):
        raise ValueError("no signed envelope")
    try:
        outer = canonical_decode(data)
        signed = outer["signed"]
        sigs = {s["keyid"]: s["sig"] for s in outer["signatures"]}
        doc = canonical_decode(signed)
    except (EncodingError, KeyError, TypeError) as exc:
        raise ValueError(f"not a signed envelope: {exc}") from exc
    if not isinstance(signed, bytes) or not isinstance(doc, dict):
        raise ValueError("not a signed envelope")
    return signed, sigs, doc


def _assignment_rollout(payload: dict[str, Any]) -> str:
    try:
        rollout = _envelope(payload.get("assignment"))[2].get("rollout", "")
    except ValueError:
        return ""
    return rollout if isinstance(rollout, str) else ""


def operator_name(operators: dict[str, Entry], keyid: str) -> str:
    """The name `operator.added` gave the key `keyid` (the key id when none did)."""
    op = operators.get(keyid)
    return str(op.payload.get("name", keyid)) if op is not None else keyid


def check_command(entry: Entry, verb: str, operators: dict[str, Entry]) -> Check:
    """The operator command kept in `entry` verifies against the key `operators` (keyid ->
    operator.added) recorded for its actor, and was signed for `verb` and this version."""
    what = f"{entry.kind} seq {entry.seq}"
    op = operators.get(entry.actor)
    signer = operator_name(operators, entry.actor)
    try:
        signed, sigs, doc = _envelope(entry.payload.get("command"))
    except ValueError as exc:
        return Check(what, signer, False, f"the operator's command is missing: {exc}")
    if op is None:
        return Check(what, signer, False, f"actor {entry.actor} is no operator of this ledger")
    if doc.get("actor") != entry.actor:
        return Check(what, signer, False, f"the command is by {doc.get('actor')}, the event "
                     f"says {entry.actor}")
    public = op.payload.get("public")
    sig = sigs.get(entry.actor, b"")
    if not isinstance(public, bytes) or not PublicKey(public).verify(DOMAIN_COMMAND, signed,
                                                                     sig):
        return Check(what, signer, False, f"the signature of {signer} does not verify")
    raw_body = doc.get("body")
    body: dict[str, Any] = raw_body if isinstance(raw_body, dict) else {}
    named = [(k, body.get(k), entry.payload.get(k)) for k in ("name", "version")
             if k in body]
    if doc.get("verb") != verb or any(str(a) != str(b) for _, a, b in named):
        return Check(what, signer, False, f"the signed command is {doc.get('verb')} "
                     f"{body.get('name', '')}/{body.get('version', '')}, not this event's")
    return Check(what, signer, True)


def check_report(report: Entry, enrolled: Entry | None) -> Check:
    """The device's signed `applied` report in `report` verifies against the key of its
    `device.enrolled` event and says what the event says."""
    device = str(report.payload.get("device", report.actor))
    what = f"{report.kind} seq {report.seq}"
    if enrolled is None:
        return Check(what, device, False, "no device.enrolled event before the report")
    try:
        signed, sigs, doc = _envelope(report.payload.get("report"))
    except ValueError as exc:
        return Check(what, device, False, f"the device's report: {exc}")
    public = enrolled.payload.get("public")
    if not isinstance(public, bytes):
        return Check(what, device, False, "device.enrolled holds no public key")
    key = PublicKey(public)
    if not key.verify(DOMAIN_DEVICE_REPORT, signed, sigs.get(key.keyid, b"")):
        return Check(what, device, False, f"the signature of device {device} does not verify")
    p = report.payload
    differ = [k for k in ("device", "model", "version", "digest", "counter")
              if doc.get(k) != p.get(k)] + ([] if doc.get("event") == "applied" else ["event"])
    if differ:
        return Check(what, device, False, f"the signed report differs from the event in "
                     f"{', '.join(differ)}")
    return Check(what, device, True)


# ---------------------------------------------------------------- sources


class StoreSource:
    """Entries from a ledger database (indexed queries)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def select(self, kinds: Sequence[str], subject: str | None = None) -> list[Entry]:
        from ledger.storage.query import EntryFilter, select_entries

        with self.store.engine.connect() as conn:
            return select_entries(conn, EntryFilter(tuple(kinds), subject=subject), None)

    def bundle(self, seq: int) -> bytes:
        from ledger.storage.bundles import make_bundle

        return make_bundle(self.store, seq)


class ExportSource:
    """Entries from an export file, read into memory. Bundles are made from the file's
    newest checkpoint with inclusion proofs computed over the file's leaves."""

    def __init__(self, path: Path) -> None:
        from ledger.export import read_export

        contents = read_export(path)
        self.entries = contents.entries
        self.notes = contents.checkpoints
        self.th = HASHES[contents.merkle_hash]
        self._leaves: list[bytes] | None = None

    def select(self, kinds: Sequence[str], subject: str | None = None) -> list[Entry]:
        return [e for e in self.entries
                if e.kind in kinds and (subject is None or e.subject == subject)]

    def bundle(self, seq: int) -> bytes:
        if not self.notes:
            raise BundleError("the export holds no signed checkpoint")
        note = self.notes[-1]
        size = Checkpoint.parse(parse_note(note)[0]).size
        if seq >= size:
            raise BundleError(f"seq {seq} is not covered by the export's newest checkpoint "
                              f"(tree size {size}); export again after the next checkpoint")
        if self._leaves is None:
            self._leaves = [self.th.leaf(e.body) for e in self.entries]
        entry = self.entries[seq]
        return canonical_encode({
            "format": BUNDLE_FORMAT, "merkle_hash": self.th.name, "seq": seq,
            "body": entry.body, "prev": entry.prev, "hash": entry.hash, "tree_size": size,
            "inclusion_proof": reference_inclusion_proof(self.th, seq, self._leaves[:size]),
            "checkpoint": note,
        })

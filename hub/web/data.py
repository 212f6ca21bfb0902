"""What each dashboard page shows, read from the hub's tables and its ledger.

Read-only: every function opens a connection, reads and returns plain maps for the
templates; nothing here writes (the import contract `web-reads` keeps it that way).
Where the CLI has a read for the same numbers, it is reused (`hub status`, `rollout
status`'s wave counts, `device show`, the report signature check), so the page and the
CLI's `--json` agree. Every list is paged: a 10,000-device fleet never reaches a page
whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
from sqlalchemy import Connection, func, select

from hub import events as ev
from hub.devices import state as device_state
from hub.devices.reads import REPORT_KINDS, report_signature
from hub.governance import state as governance
from hub.rollouts import rules as ro
from hub.rollouts import state as rs
from hub.telemetry.ingest import TelemetryIngest
from ledger.errors import ProofError
from ledger.merkle import verify_inclusion
from ledger.storage import query
from ledger.storage.checkpoint_store import CheckpointStore
from ledger.storage.schema import ENTRIES
from ledger.storage.store import LedgerStore

PAGE = 50  # rows per page, on every page
TRANSITIONS = ("start", "pause", "resume", "abort", "rollback")


@dataclass(frozen=True)
class DashboardSources:
    """What the dashboard reads, handed over by the composition root (hub.service.app)."""

    store: LedgerStore
    telemetry: TelemetryIngest
    status: Callable[[], dict[str, Any]]  # the `hub status` document, the same numbers
    checkpoints: Callable[[], CheckpointStore | None]  # None until the hub signs any
    home: Path  # the hub home, for the commands a page suggests


class NotFound(Exception):
    """The page names something the hub does not have (404)."""


class BadQuery(Exception):
    """A filter that cannot be read (400); the message says the expected form."""


# ---------------------------------------------------------------- shown values

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
# Keys whose values are never shown, should a payload or status ever carry one.
_SECRET_KEYS = re.compile(r"(password|passwd|secret|token|seed|private)", re.IGNORECASE)
BYTES_SHOWN = 32


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host` (database or NATS URLs in
    an error message)."""
    return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)


def shown(value: Any) -> Any:
    """A ledger payload as plain data to print: bytes as hex (long ones cut, with their
    length), secrets by key name hidden, text with URL credentials redacted."""
    if isinstance(value, bytes):
        if len(value) <= BYTES_SHOWN:
            return value.hex()
        return f"{value[:BYTES_SHOWN].hex()}… ({len(value)} bytes)"
    if isinstance(value, dict):
        return {str(k): "[hidden]" if _SECRET_KEYS.search(str(k)) else shown(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shown(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def utc(ts_ns: int | None) -> str:
    if not ts_ns:
        return "-"
    return datetime.fromtimestamp(ts_ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def parse_time(text: str, what: str) -> int | None:
    """`2026-12-06`, `2026-12-06T03:00` or `2026-12-06 03:00:00` (UTC unless an offset
    is given) as ns; empty: None."""
    text = text.strip()
    if not text:
        return None
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(f"{what}: expected a time such as 2026-12-06T03:00 (UTC)") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return int(stamp.timestamp() * 1e9)


# ---------------------------------------------------------------- overview


def overview(src: DashboardSources) -> dict[str, Any]:
    status = src.status()
    db = status.get("database") or {}
    if db.get("error"):
        status = {**status, "database": {**db, "error": redact(str(db["error"]))}}
    for task in status.get("tasks") or []:
        task["last_error"] = redact(str(task.get("last_error") or ""))
    with src.store.engine.connect() as conn:
        d = device_state.DEVICES
        by_version = [(str(m or "-"), str(v or "-"), int(n)) for m, v, n in conn.execute(
            select(d.c.model, d.c.version, func.count()).group_by(d.c.model, d.c.version)
            .order_by(func.count().desc(), d.c.model, d.c.version).limit(PAGE))]
        counts = rs.device_state_counts(conn)
        recent = conn.execute(select(rs.ROLLOUTS).order_by(rs.ROLLOUTS.c.created_seq.desc())
                              .limit(10)).mappings().all()
    rollouts = [{"rollout": r["rollout"], "model": r["model"], "version": r["version"],
                 "state": r["state"], "wave": r["current_wave"] + 1, "target": r["target"],
                 "counts": counts.get(r["rollout"], {})} for r in recent]
    return {"status": status, "by_version": by_version, "recent_rollouts": rollouts}


# ---------------------------------------------------------------- devices


def devices(src: DashboardSources, state: str | None, offset: int) -> dict[str, Any]:
    with src.store.engine.connect() as conn:
        rows = device_state.list_devices(conn, state, offset, PAGE + 1)
        states = device_state.device_states(conn)
    total = states.get(state, 0) if state else sum(states.values())
    return {"devices": rows[:PAGE], "states": states, "state": state or "", "total": total,
            "offset": offset, "next_offset": offset + PAGE if len(rows) > PAGE else None}


def device(src: DashboardSources, device_id: str, before: int | None) -> dict[str, Any]:
    """One device: its row, group and tags, telemetry counters, active rollout and a page
    of its history, each report with its signature checked against the enrolled key
    (`hub device history`'s check). Reads only this device's rows: `device show`'s read
    loads every device's tags, too slow at 10,000 devices."""
    with src.store.engine.connect() as conn:
        row = device_state.get_device(conn, device_id)
        if row is None:
            raise NotFound(f"no device {device_id} is enrolled")
        tags = conn.execute(select(rs.TAGS).where(rs.TAGS.c.device == device_id)).first()
        t = device_state.TELEMETRY
        telemetry = conn.execute(select(t).where(t.c.device == device_id)).mappings().first()
        active = conn.execute(
            select(rs.ROLLOUT_DEVICES.c.rollout).select_from(rs.ROLLOUT_DEVICES.join(
                rs.ROLLOUTS, rs.ROLLOUTS.c.rollout == rs.ROLLOUT_DEVICES.c.rollout))
            .where(rs.ROLLOUT_DEVICES.c.device == device_id,
                   rs.ROLLOUTS.c.state.in_(ro.ACTIVE_STATES))).scalar()
        entries = query.select_entries(
            conn, query.EntryFilter(subject=ev.device_subject(device_id), before_seq=before),
            limit=PAGE + 1, newest=True)
    public = row.pop("public", None)
    more = len(entries) > PAGE
    history = []
    for e in reversed(entries[1:] if more else entries):
        signature = (report_signature(e.payload, public) if e.kind in REPORT_KINDS else None)
        history.append({"seq": e.seq, "ts": e.ts, "kind": e.kind, "actor": e.actor,
                        "signature": signature, "summary": _summary(e.payload)})
    return {"device": row, "group": tags.device_group if tags is not None else "",
            "tags": json.loads(tags.tags) if tags is not None else {},
            "telemetry": dict(telemetry) if telemetry is not None else None,
            "rollout": active, "public": public.hex() if isinstance(public, bytes) else "",
            "history": history, "older": entries[1].seq if more else None,
            "telemetry_rows": src.telemetry.device_rows(device_id)}


_SUMMARY_KEYS = ("model", "version", "rollout", "wave", "counter", "reason", "state", "group",
                 "boot")


def _summary(payload: dict[str, Any]) -> str:
    """A one-line gist of a payload for tables (the entry page has all of it)."""
    parts = [f"{k}={shown(payload[k])}" for k in _SUMMARY_KEYS
             if k in payload and not isinstance(payload[k], dict | list | bytes)]
    return ", ".join(parts)[:300]


def _listed(conn: Connection, flt: query.EntryFilter) -> list[dict[str, Any]]:
    """The newest PAGE + 1 entries matching `flt`, newest first, for a list: the indexed
    columns and the payload decoded with plain msgpack. Display only: the entry page
    reads an entry strictly (Entry.from_body). A strict decode re-checks every map
    and re-encodes the payload; a `rollout.created` for 10,000 devices takes ~5 ms that
    way, a page of them a quarter of a second."""
    c = ENTRIES.c
    rows = conn.execute(select(c.seq, c.ts, c.kind, c.actor, c.subject, c.body)
                        .where(*flt.where()).order_by(c.seq.desc()).limit(PAGE + 1))
    out = []
    for seq, ts, kind, actor, subject, body in rows:
        try:
            payload = msgpack.unpackb(bytes(body), raw=False, strict_map_key=False)[5]
        except Exception:  # shown as such; the entry page says what is wrong
            payload = {}
        out.append({"seq": int(seq), "ts": int(ts), "kind": kind, "actor": actor,
                    "subject": subject,
                    "payload": payload if isinstance(payload, dict) else {}})
    return out


# ---------------------------------------------------------------- rollouts


def rollout(src: DashboardSources, rid: str, before: int | None,
            offset: int) -> dict[str, Any]:
    with src.store.engine.connect() as conn:
        row = rs.get_rollout(conn, rid)
        if row is None:
            raise NotFound(f"no rollout {rid}")
        progress = _progress(conn, row)
        # Telemetry is keyed by assignment: only members that were assigned have any.
        t = rs.ROLLOUT_DEVICES
        assigned = [rs.Member(*r) for r in conn.execute(
            select(t.c.wave, t.c.device, t.c.state, t.c.counter)
            .where(t.c.rollout == rid, t.c.counter != 0))]
        telemetry = rs.telemetry_view(conn, src.telemetry, row, assigned).evidence()
        decisions = _listed(conn, query.EntryFilter(subject=ev.rollout_subject(rid),
                                                    before_seq=before))
        page = [dict(r) for r in conn.execute(
            select(t.c.device, t.c.wave, t.c.state, t.c.reason, t.c.updated_ts)
            .where(t.c.rollout == rid).order_by(t.c.wave, t.c.device)
            .offset(offset).limit(PAGE + 1)).mappings()]
    more = len(decisions) > PAGE
    shown_decisions = [{"seq": e["seq"], "ts": e["ts"], "kind": e["kind"], "actor": e["actor"],
                        "reason": shown(e["payload"].get("reason", "")),
                        "evidence": shown(e["payload"].get("evidence") or {})}
                       for e in decisions[:PAGE]]
    actions = [a for a in TRANSITIONS if row["state"] in ro.ALLOWED_FROM[a]]
    return {"rollout": row, "progress": progress, "telemetry": telemetry,
            "decisions": shown_decisions, "older": decisions[PAGE - 1]["seq"] if more else None,
            "devices": page[:PAGE], "offset": offset,
            "next_offset": offset + PAGE if len(page) > PAGE else None, "actions": actions,
            "gates": {k: row["policy"].get(k) for k in
                      ("max_error_rate", "max_p95_ms", "max_psi")}}


def progress(src: DashboardSources, rid: str) -> dict[str, Any]:
    """The live part of a rollout page, as the page's script polls it."""
    with src.store.engine.connect() as conn:
        row = rs.get_rollout(conn, rid)
        if row is None:
            raise NotFound(f"no rollout {rid}")
        return _progress(conn, row)


def _progress(conn: Connection, row: dict[str, Any]) -> dict[str, Any]:
    """State and per-wave counts: the tally `hub rollout status --json` shows
    (rules.wave_tally), of states counted by the database, not of 10,000 rows."""
    states = rs.wave_state_counts(conn, row["rollout"])
    waves = []
    for w in rs.list_waves(conn, row["rollout"]):
        waves.append({"wave": w["wave"], "state": w["state"], "size": w["size"],
                      "started": utc(w["started_ts"]), "ended": utc(w["ended_ts"]),
                      "evidence": shown(w["evidence"]),
                      "counts": ro.wave_tally(states.get(w["wave"], {}))})
    return {"rollout": row["rollout"], "state": row["state"],
            "current_wave": row["current_wave"], "reason": row["reason"],
            "updated": utc(row["updated_ts"]), "waves": waves}


# ---------------------------------------------------------------- models


def models(src: DashboardSources) -> dict[str, Any]:
    with src.store.engine.connect() as conn:
        releases = governance.list_releases(conn)
        names = _operator_names(conn)
    rows = [{"name": r["name"], "version": r["version"], "state": r["state"],
             "digest": r["digest"], "registered": utc(r["registered_ts"]),
             "registered_seq": r["registered_seq"],
             "passed": (r["validation"] or {}).get("passed"),
             "approvals": [names.get(a, a) for a in r["approvals"]],
             "approvals_required": r["approvals_required"],
             "parent": shown((r["lineage"] or {}).get("parent", ""))}
            for r in releases]
    return {"releases": rows}


def model(src: DashboardSources, name: str, version: str) -> dict[str, Any]:
    with src.store.engine.connect() as conn:
        row = governance.get_release(conn, name, version)
        if row is None:
            raise NotFound(f"no model {name}/{version}")
        names = _operator_names(conn)
        events = query.select_entries(
            conn, query.EntryFilter(subject=ev.model_subject(name, version)), limit=PAGE)
    validation = row["validation"] or {}
    metrics = validation.get("metrics") or {}
    return {
        "release": {k: shown(v) for k, v in row.items()
                    if k not in ("validation", "card", "lineage", "inputs", "outputs")},
        "registrant": names.get(row["registrant"], row["registrant"]),
        "approvals": [{"keyid": a, "name": names.get(a, "")} for a in row["approvals"]],
        "lineage": shown(row["lineage"] or {}), "card": shown(row["card"] or {}),
        "inputs": shown(row["inputs"]), "outputs": shown(row["outputs"]),
        "passed": validation.get("passed"),
        "failures": shown(validation.get("failures") or []),
        "metrics": sorted((str(k), v) for k, v in metrics.items()
                          if isinstance(v, int | float) and not isinstance(v, bool)),
        "policy": shown(validation.get("policy") or {}),
        "events": [{"seq": e.seq, "ts": e.ts, "kind": e.kind,
                    "actor": names.get(e.actor, e.actor)} for e in events],
    }


def _operator_names(conn: Connection) -> dict[str, str]:
    return {o["keyid"]: o["name"] for o in governance.list_operators(conn)}


# ---------------------------------------------------------------- ledger


@dataclass(frozen=True)
class LedgerFilter:
    kind: str = ""  # exact, or a prefix with a trailing *
    subject: str = ""  # the same
    actor: str = ""
    since: str = ""  # times as typed (parse_time)
    until: str = ""

    def entry_filter(self, before: int | None) -> query.EntryFilter:
        kind, subject = self.kind.strip(), self.subject.strip()
        return query.EntryFilter(
            kinds=(kind,) if kind and not kind.endswith("*") else (),
            kind_prefixes=(kind[:-1],) if kind.endswith("*") else (),
            subject=subject if subject and not subject.endswith("*") else None,
            subject_prefix=subject[:-1] if subject.endswith("*") and subject != "*" else None,
            actor=self.actor.strip() or None,
            since_ns=parse_time(self.since, "from"), until_ns=parse_time(self.until, "to"),
            before_seq=before)


def ledger(src: DashboardSources, flt: LedgerFilter, before: int | None) -> dict[str, Any]:
    with src.store.engine.connect() as conn:
        entries = _listed(conn, flt.entry_filter(before))
        head = query.head_seq(conn)
    page = entries[:PAGE]
    for e in page:
        e["summary"] = _summary(e.pop("payload"))
    return {"entries": page, "older": page[-1]["seq"] if len(entries) > PAGE else None,
            "head": head}


def entry(src: DashboardSources, seq: int) -> dict[str, Any]:
    """One entry decoded, with its inclusion proof in the latest signed checkpoint,
    checked here with the ledger's own verifier (RFC 9162)."""
    store = src.store
    found = store.get(seq)
    if found is None:
        raise NotFound(f"no entry {seq}")
    checkpoints = src.checkpoints()
    latest = checkpoints.latest() if checkpoints is not None else None
    proof: dict[str, Any] | None = None
    if latest is not None and seq < latest.size:
        th = store.tree_hash
        leaf = th.leaf(found.body)  # from the entry's bytes, not the stored tree
        path = store.inclusion_proof(seq, latest.size)
        try:
            verify_inclusion(th, seq, latest.size, leaf, path, latest.root)
            verdict = "verified"
        except ProofError as exc:
            verdict = f"FAILED: {exc}"
        proof = {"size": latest.size, "root": latest.root.hex(), "leaf": leaf.hex(),
                 "path": [p.hex() for p in path], "tree_hash": th.name, "verdict": verdict,
                 "signed": utc(latest.ts), "note": latest.full_note().decode(errors="replace"),
                 "witnesses": sorted({s.name for s in latest.cosignatures})}
    return {"seq": found.seq, "ts": found.ts, "kind": found.kind, "actor": found.actor,
            "subject": found.subject, "payload": shown(found.payload),
            "hash": found.hash.hex(), "prev": found.prev.hex(),
            "checkpoint_size": latest.size if latest is not None else None, "proof": proof}

"""Hub state as a fold of ledger events (event sourcing).

`apply_entries` is called by the ledger store inside the append transaction, so an
event and its effect on these tables commit together or not at all, and `hub rebuild`
replays the same function over the whole ledger into empty tables. Nothing else
writes the projection tables. Device telemetry counters are not lifecycle facts and
live in their own table (`device_telemetry`), fed by the telemetry stream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, func, insert, select, update
from sqlmodel import Field, SQLModel

from edge_agent.protocol import ProtocolError, SignedEnvelope
from hub import events as ev
from hub.columns import int64_columns
from hub.governance import rules as lc
from hub.rollouts import state as rollout_state
from ledger.encoding import canonical_decode
from ledger.entry import Entry


class OperatorRow(SQLModel, table=True):
    __tablename__ = "proj_operators"
    keyid: str = Field(primary_key=True)
    name: str = Field(index=True)
    public: bytes
    roles: str  # JSON list
    revoked: bool = False
    added_seq: int


class NonceRow(SQLModel, table=True):
    """Nonces of accepted operator commands: a replay is refused."""

    __tablename__ = "proj_nonces"
    nonce: str = Field(primary_key=True)
    seq: int


class ReleaseRow(SQLModel, table=True):
    __tablename__ = "proj_releases"
    name: str = Field(primary_key=True)
    version: str = Field(primary_key=True)
    digest: str
    size: int
    state: str
    registrant: str  # actor (key id) who registered it
    inputs: str = "[]"  # JSON
    outputs: str = "[]"  # JSON
    lineage: str = "{}"  # JSON
    card: str = "{}"  # JSON
    validation: str = "{}"  # JSON: the last validation payload without the command
    approvals: str = "[]"  # JSON list of approver key ids
    approvals_required: int = 1
    manifest_hash: str = ""
    reason: str = ""
    registered_seq: int
    registered_ts: int
    updated_seq: int = 0


class DeviceRow(SQLModel, table=True):
    __tablename__ = "proj_devices"
    device: str = Field(primary_key=True)
    enrolled_seq: int
    public: bytes | None = None  # the device's Ed25519 key: its status reports are signed
    counter: int = 0  # last assignment counter the hub issued
    assigned_model: str | None = None
    assigned_version: str | None = None
    model: str | None = None  # what the device last said it runs
    version: str | None = None
    digest: str | None = None
    state: str = "enrolled"  # enrolled | assigned | applied | failed | reverted | revoked
    last_error: str | None = None
    last_report_boot: str | None = None
    last_report_seq: int | None = None
    updated_ts: int = 0


class DeviceTelemetryRow(SQLModel, table=True):
    """Counters from telemetry windows; not derived from the ledger."""

    __tablename__ = "device_telemetry"
    device: str = Field(primary_key=True)
    last_seen: int = 0
    inferences: int = 0
    errors: int = 0
    latency_ms_p95: float = 0.0
    boot: str = ""
    window_seq: int = -1


OPERATORS: Table = SQLModel.metadata.tables[OperatorRow.__tablename__]
NONCES: Table = SQLModel.metadata.tables[NonceRow.__tablename__]
RELEASES: Table = SQLModel.metadata.tables[ReleaseRow.__tablename__]
DEVICES: Table = SQLModel.metadata.tables[DeviceRow.__tablename__]
TELEMETRY: Table = SQLModel.metadata.tables[DeviceTelemetryRow.__tablename__]
int64_columns(OPERATORS, NONCES, RELEASES, DEVICES, TELEMETRY)

# The tables `hub rebuild` must reproduce exactly from the ledger.
LEDGER_PROJECTIONS: tuple[Table, ...] = (OPERATORS, NONCES, RELEASES, DEVICES,
                                         *rollout_state.TABLES)


def create_tables(conn: Connection, include_telemetry: bool = True) -> None:
    tables = LEDGER_PROJECTIONS + ((TELEMETRY,) if include_telemetry else ())
    for table in tables:
        table.create(conn, checkfirst=True)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=lambda v: v.hex())


def apply_entries(conn: Connection, entries: Sequence[Entry]) -> None:
    for entry in entries:
        command = entry.payload.get("command")
        if isinstance(command, bytes):
            _record_nonce(conn, entry.seq, command)
        handler = _HANDLERS.get(entry.kind)
        if handler is not None:
            handler(conn, entry, entry.payload)
        rollout_state.apply(conn, entry)  # groups, tags, rollouts, waves


def _record_nonce(conn: Connection, seq: int, envelope: bytes) -> None:
    try:
        doc = canonical_decode(SignedEnvelope.decode(envelope).signed)
    except (ProtocolError, ValueError):
        return
    nonce = doc.get("nonce") if isinstance(doc, dict) else None
    if isinstance(nonce, str) and conn.execute(
        select(NONCES.c.nonce).where(NONCES.c.nonce == nonce)
    ).first() is None:
        conn.execute(insert(NONCES).values(nonce=nonce, seq=seq))


# ---------------------------------------------------------------- operators


def _operator_added(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(insert(OPERATORS).values(
        keyid=p["keyid"], name=p["name"], public=p["public"], roles=_json(sorted(p["roles"])),
        revoked=False, added_seq=entry.seq,
    ))


def _operator_revoked(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(update(OPERATORS).where(OPERATORS.c.keyid == p["keyid"]).values(revoked=True))


# ---------------------------------------------------------------- models


def _release_update(conn: Connection, entry: Entry, p: dict[str, Any], **values: Any) -> None:
    conn.execute(
        update(RELEASES)
        .where(RELEASES.c.name == p["name"], RELEASES.c.version == p["version"])
        .values(updated_seq=entry.seq, **values)
    )


def _registered(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(insert(RELEASES).values(
        name=p["name"], version=p["version"], digest=p["digest"], size=p["size"],
        state=lc.REGISTERED, registrant=entry.actor, inputs=_json(p.get("inputs", [])),
        outputs=_json(p.get("outputs", [])), lineage=_json(p.get("lineage", {})),
        card=_json(p.get("card", {})), registered_seq=entry.seq, registered_ts=entry.ts,
        updated_seq=entry.seq,
    ))


def _validated(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    report = {k: v for k, v in p.items() if k not in ("command", "name", "version")}
    _release_update(
        conn, entry, p,
        state=lc.VALIDATED if p["passed"] else lc.VALIDATION_FAILED,
        validation=_json(report), approvals="[]",
        approvals_required=int(p.get("approvals_required", 1)),
    )


def _approved(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    row = get_release(conn, p["name"], p["version"])
    if row is None:
        return
    approvals = [*row["approvals"], entry.actor]
    state = lc.APPROVED if len(approvals) >= row["approvals_required"] else row["state"]
    _release_update(conn, entry, p, approvals=_json(approvals), state=state)


def _state_change(state: str) -> Any:
    def handler(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
        values: dict[str, Any] = {"state": state}
        if "reason" in p:
            values["reason"] = p["reason"]
        if "manifest_hash" in p:
            values["manifest_hash"] = p["manifest_hash"]
        _release_update(conn, entry, p, **values)

    return handler


# ---------------------------------------------------------------- devices


def _enrolled(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    public = p.get("public")
    conn.execute(insert(DEVICES).values(
        device=p["device"], enrolled_seq=entry.seq, updated_ts=entry.ts,
        public=public if isinstance(public, bytes) else None,
    ))


def _device_update(conn: Connection, device: str, **values: Any) -> None:
    conn.execute(update(DEVICES).where(DEVICES.c.device == device).values(**values))


def _assigned(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _device_update(
        conn, p["device"], counter=p["counter"], assigned_model=p["model"],
        assigned_version=p["version"], state="assigned", last_error=None, updated_ts=entry.ts,
    )


def _applied(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _device_update(
        conn, p["device"], model=p["model"], version=p["version"], digest=p["digest"],
        state="applied", last_error=None, last_report_boot=p["boot"],
        last_report_seq=p["report_seq"], updated_ts=entry.ts,
    )


def _failed(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _device_update(
        conn, p["device"], state="failed", last_error=p["reason"], last_report_boot=p["boot"],
        last_report_seq=p["report_seq"], updated_ts=entry.ts,
    )


def _reverted(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _device_update(
        conn, p["device"], model=p["model"], version=p["version"], digest=p["digest"],
        state="reverted", last_error=p["reason"], last_report_boot=p["boot"],
        last_report_seq=p["report_seq"], updated_ts=entry.ts,
    )


_HANDLERS = {
    ev.OPERATOR_ADDED: _operator_added,
    ev.OPERATOR_REVOKED: _operator_revoked,
    ev.MODEL_REGISTERED: _registered,
    ev.MODEL_VALIDATED: _validated,
    ev.MODEL_APPROVED: _approved,
    ev.MODEL_REJECTED: _state_change(lc.REJECTED),
    ev.MODEL_RELEASED: _state_change(lc.RELEASED),
    ev.MODEL_DEPRECATED: _state_change(lc.DEPRECATED),
    ev.MODEL_REVOKED: _state_change(lc.REVOKED),
    ev.MODEL_RESIGNED: lambda conn, entry, p: _release_update(
        conn, entry, p, manifest_hash=p["manifest_hash"]),
    ev.DEVICE_ENROLLED: _enrolled,
    ev.DEVICE_REVOKED: lambda conn, entry, p: _device_update(
        conn, p["device"], state="revoked", last_error=p["reason"] or "revoked",
        updated_ts=entry.ts),
    ev.DEVICE_ASSIGNED: _assigned,
    ev.DEVICE_UPDATE_APPLIED: _applied,
    ev.DEVICE_UPDATE_FAILED: _failed,
    ev.DEVICE_UPDATE_REVERTED: _reverted,
}


# ---------------------------------------------------------------- reads

_JSON_COLUMNS = ("inputs", "outputs", "lineage", "card", "validation", "approvals", "roles")


def _row(mapping: Any) -> dict[str, Any]:
    out = dict(mapping)
    for column in _JSON_COLUMNS:
        if isinstance(out.get(column), str):
            out[column] = json.loads(out[column])
    return out


def get_device(conn: Connection, device: str) -> dict[str, Any] | None:
    row = conn.execute(select(DEVICES).where(DEVICES.c.device == device)).mappings().first()
    return _row(row) if row is not None else None


def get_devices(conn: Connection, devices: list[str]) -> dict[str, dict[str, Any]]:
    """Several devices' rows in one query (those that exist)."""
    rows = conn.execute(select(DEVICES).where(DEVICES.c.device.in_(devices))).mappings()
    return {r["device"]: _row(r) for r in rows}


def get_release(conn: Connection, name: str, version: str) -> dict[str, Any] | None:
    query = select(RELEASES).where(RELEASES.c.name == name, RELEASES.c.version == version)
    row = conn.execute(query).mappings().first()
    return _row(row) if row is not None else None


def list_devices(conn: Connection, state: str | None = None, offset: int = 0,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """Devices joined with their telemetry counters, ordered by id; optionally only those
    in `state`, and one page of them."""
    query = (
        select(DEVICES, TELEMETRY.c.last_seen, TELEMETRY.c.inferences, TELEMETRY.c.errors,
               TELEMETRY.c.latency_ms_p95)
        .select_from(DEVICES.outerjoin(TELEMETRY, DEVICES.c.device == TELEMETRY.c.device))
        .order_by(DEVICES.c.device)
    )
    if state is not None:
        query = query.where(DEVICES.c.state == state)
    if offset:
        query = query.offset(offset)
    if limit is not None:
        query = query.limit(limit)
    return [_row(r) for r in conn.execute(query).mappings()]


def device_states(conn: Connection) -> dict[str, int]:
    """How many devices are in each state."""
    rows = conn.execute(select(DEVICES.c.state, func.count()).group_by(DEVICES.c.state))
    return {str(state): int(n) for state, n in rows}


def list_releases(conn: Connection, name: str | None = None) -> list[dict[str, Any]]:
    query = select(RELEASES).order_by(RELEASES.c.name, RELEASES.c.registered_seq)
    if name is not None:
        query = query.where(RELEASES.c.name == name)
    return [_row(r) for r in conn.execute(query).mappings()]


def list_operators(conn: Connection) -> list[dict[str, Any]]:
    query = select(OPERATORS).order_by(OPERATORS.c.added_seq)
    return [_row(r) for r in conn.execute(query).mappings()]


def nonce_used(conn: Connection, nonce: str) -> bool:
    return conn.execute(select(NONCES.c.nonce).where(NONCES.c.nonce == nonce)).first() is not None

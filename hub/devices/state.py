"""Device state: enrolled devices (a fold of ledger events; HANDLERS) and their
telemetry counters (`device_telemetry`: not derived from the ledger, fed by report
intake and the telemetry stream)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Table, case, func, insert, select, update
from sqlmodel import Field, SQLModel

from hub import events as ev
from hub.columns import int64_columns, row_dict
from ledger.entry import Entry

REVOKED = "revoked"  # proj_devices.state of a revoked device


class DeviceRow(SQLModel, table=True):
    __tablename__ = "proj_devices"
    device: str = Field(primary_key=True)
    enrolled_seq: int
    # the device's Ed25519 key: its status reports are signed; indexed for
    # identity_holder (an enrolment asks whether the key is taken)
    public: bytes | None = Field(default=None, index=True)
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


class EnrolTokenRow(SQLModel, table=True):
    """One-time enrolment tokens (`device.token_created`); `used_seq` is set by the
    `device.enrolled` event that used it (its `token` field)."""

    __tablename__ = "proj_enrol_tokens"
    token_id: str = Field(primary_key=True)  # the first 16 hex digits of token_hash
    device: str
    token_hash: str  # BLAKE3 hex of the token; the token itself is nowhere in the hub
    expires: int
    created_by: str  # the operator key id that made it
    created_seq: int
    used_seq: int | None = None


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


DEVICES: Table = SQLModel.metadata.tables[DeviceRow.__tablename__]
TELEMETRY: Table = SQLModel.metadata.tables[DeviceTelemetryRow.__tablename__]
TOKENS: Table = SQLModel.metadata.tables[EnrolTokenRow.__tablename__]
int64_columns(DEVICES, TELEMETRY, TOKENS)

TABLES: tuple[Table, ...] = (DEVICES, TOKENS)  # folded from the ledger (TELEMETRY is not)


# ---------------------------------------------------------------- fold


def _enrolled(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    public = p.get("public")
    conn.execute(insert(DEVICES).values(
        device=p["device"], enrolled_seq=entry.seq, updated_ts=entry.ts,
        public=public if isinstance(public, bytes) else None,
    ))
    token = p.get("token")
    if isinstance(token, str):  # enrolled by the device itself, with a one-time token
        conn.execute(update(TOKENS).where(TOKENS.c.token_id == token).values(
            used_seq=entry.seq))


def _token_created(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(insert(TOKENS).values(
        token_id=p["token_id"], device=p["device"], token_hash=p["token_hash"],
        expires=p["expires"], created_by=entry.actor, created_seq=entry.seq))


def _device_update(conn: Connection, device: str, **values: Any) -> None:
    """Update a device's row; a revoked device stays revoked (and keeps the reason in
    `last_error`) whatever event comes after its revocation (an old ledger may hold an
    assignment or a late report after it)."""
    for column in ("state", "last_error"):
        if column in values:
            values[column] = case((DEVICES.c.state == REVOKED, DEVICES.c[column]),
                                  else_=values[column])
    conn.execute(update(DEVICES).where(DEVICES.c.device == device).values(**values))


def _revoked(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(update(DEVICES).where(DEVICES.c.device == p["device"]).values(
        state=REVOKED, last_error=p["reason"] or "revoked", updated_ts=entry.ts))


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


Handler = Callable[[Connection, Entry, dict[str, Any]], None]
HANDLERS: dict[str, Handler] = {
    ev.DEVICE_ENROLLED: _enrolled,
    ev.DEVICE_REVOKED: _revoked,
    ev.DEVICE_TOKEN_CREATED: _token_created,
    ev.DEVICE_ASSIGNED: _assigned,
    ev.DEVICE_UPDATE_APPLIED: _applied,
    ev.DEVICE_UPDATE_FAILED: _failed,
    ev.DEVICE_UPDATE_REVERTED: _reverted,
}


# ---------------------------------------------------------------- reads


def get_token(conn: Connection, token_id: str) -> dict[str, Any] | None:
    row = conn.execute(select(TOKENS).where(TOKENS.c.token_id == token_id)).mappings().first()
    return None if row is None else dict(row)


def get_device(conn: Connection, device: str) -> dict[str, Any] | None:
    row = conn.execute(select(DEVICES).where(DEVICES.c.device == device)).mappings().first()
    return row_dict(row, ()) if row is not None else None


def get_devices(conn: Connection, devices: list[str]) -> dict[str, dict[str, Any]]:
    """Several devices' rows in one query (those that exist)."""
    rows = conn.execute(select(DEVICES).where(DEVICES.c.device.in_(devices))).mappings()
    return {r["device"]: row_dict(r, ()) for r in rows}


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
    return [row_dict(r, ()) for r in conn.execute(query).mappings()]


def device_states(conn: Connection) -> dict[str, int]:
    """How many devices are in each state."""
    rows = conn.execute(select(DEVICES.c.state, func.count()).group_by(DEVICES.c.state))
    return {str(state): int(n) for state, n in rows}

"""Hub state as a fold of ledger events (event sourcing).

`apply_entries` is called by the ledger store inside the append transaction, so
an event and its effect on these tables commit together or not at all. Nothing
else writes the projection tables. Device telemetry counters are not lifecycle
facts and are kept in their own table, fed by the telemetry stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert, select, update
from sqlmodel import Field, SQLModel

from ledger.entry import Entry

from . import events as ev


class ReleaseRow(SQLModel, table=True):
    __tablename__ = "proj_releases"
    name: str = Field(primary_key=True)
    version: str = Field(primary_key=True)
    digest: str
    size: int
    state: str  # registered | released
    manifest_hash: str = ""
    registered_seq: int
    registered_ts: int


class DeviceRow(SQLModel, table=True):
    __tablename__ = "proj_devices"
    device: str = Field(primary_key=True)
    enrolled_seq: int
    counter: int = 0  # last assignment counter the hub issued
    assigned_model: str | None = None
    assigned_version: str | None = None
    model: str | None = None  # what the device last said it runs
    version: str | None = None
    digest: str | None = None
    state: str = "enrolled"  # enrolled | assigned | applied | failed
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


RELEASES: Table = SQLModel.metadata.tables[ReleaseRow.__tablename__]
DEVICES: Table = SQLModel.metadata.tables[DeviceRow.__tablename__]
TELEMETRY: Table = SQLModel.metadata.tables[DeviceTelemetryRow.__tablename__]


def create_tables(conn: Connection) -> None:
    for table in (RELEASES, DEVICES, TELEMETRY):
        table.create(conn, checkfirst=True)


def apply_entries(conn: Connection, entries: Sequence[Entry]) -> None:
    for entry in entries:
        handler = _HANDLERS.get(entry.kind)
        if handler is not None:
            handler(conn, entry, entry.payload)


def _registered(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(
        insert(RELEASES).values(
            name=p["name"], version=p["version"], digest=p["digest"], size=p["size"],
            state="registered", registered_seq=entry.seq, registered_ts=entry.ts,
        )
    )


def _released(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(
        update(RELEASES)
        .where(RELEASES.c.name == p["name"], RELEASES.c.version == p["version"])
        .values(state="released", manifest_hash=p["manifest_hash"])
    )


def _enrolled(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(
        insert(DEVICES).values(device=p["device"], enrolled_seq=entry.seq, updated_ts=entry.ts)
    )


def _assigned(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(
        update(DEVICES)
        .where(DEVICES.c.device == p["device"])
        .values(
            counter=p["counter"], assigned_model=p["model"], assigned_version=p["version"],
            state="assigned", last_error=None, updated_ts=entry.ts,
        )
    )


def _applied(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(
        update(DEVICES)
        .where(DEVICES.c.device == p["device"])
        .values(
            model=p["model"], version=p["version"], digest=p["digest"], state="applied",
            last_error=None, last_report_boot=p["boot"], last_report_seq=p["report_seq"],
            updated_ts=entry.ts,
        )
    )


def _failed(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(
        update(DEVICES)
        .where(DEVICES.c.device == p["device"])
        .values(
            state="failed", last_error=p["reason"], last_report_boot=p["boot"],
            last_report_seq=p["report_seq"], updated_ts=entry.ts,
        )
    )


_HANDLERS = {
    ev.MODEL_REGISTERED: _registered,
    ev.MODEL_RELEASED: _released,
    ev.DEVICE_ENROLLED: _enrolled,
    ev.DEVICE_ASSIGNED: _assigned,
    ev.DEVICE_UPDATE_APPLIED: _applied,
    ev.DEVICE_UPDATE_FAILED: _failed,
}


# ---------------------------------------------------------------- reads


def get_device(conn: Connection, device: str) -> dict[str, Any] | None:
    row = conn.execute(select(DEVICES).where(DEVICES.c.device == device)).mappings().first()
    return dict(row) if row is not None else None


def get_release(conn: Connection, name: str, version: str) -> dict[str, Any] | None:
    row = (
        conn.execute(
            select(RELEASES).where(RELEASES.c.name == name, RELEASES.c.version == version)
        )
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None


def list_devices(conn: Connection) -> list[dict[str, Any]]:
    """Devices joined with their telemetry counters, ordered by id."""
    query = (
        select(DEVICES, TELEMETRY.c.last_seen, TELEMETRY.c.inferences, TELEMETRY.c.errors,
               TELEMETRY.c.latency_ms_p95)
        .select_from(DEVICES.outerjoin(TELEMETRY, DEVICES.c.device == TELEMETRY.c.device))
        .order_by(DEVICES.c.device)
    )
    return [dict(r) for r in conn.execute(query).mappings()]


def list_releases(conn: Connection) -> list[dict[str, Any]]:
    query = select(RELEASES).order_by(RELEASES.c.name, RELEASES.c.registered_seq)
    return [dict(r) for r in conn.execute(query).mappings()]

"""Rollout state: device groups/tags, rollouts, waves and each device's part in a
rollout, folded from ledger events only (HANDLERS; hub.fold composes every
capability's, inside the append transaction, and `hub rebuild` replays them), and the
reads the controller, the commands and the read verbs share.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table, and_, func, insert, select, update
from sqlmodel import Field, SQLModel

from hub import events as ev
from hub.columns import int64_columns, json_text, row_dict
from hub.governance import state as governance
from hub.rollouts import rules as ro
from ledger.entry import Entry

if TYPE_CHECKING:
    from hub.telemetry.ingest import TelemetryIngest


class DeviceTagRow(SQLModel, table=True):
    __tablename__ = "proj_device_tags"
    device: str = Field(primary_key=True)
    device_group: str = ""
    tags: str = "{}"  # JSON map
    updated_seq: int = 0


class RolloutRow(SQLModel, table=True):
    __tablename__ = "proj_rollouts"
    rollout: str = Field(primary_key=True)
    model: str
    version: str
    digest: str
    manifest_hash: str
    target: str
    waves: str = "[]"  # JSON: the wave specs as given
    policy: str = "{}"  # JSON
    state: str = ro.CREATED
    current_wave: int = -1
    reason: str = ""
    creator: str = ""
    created_seq: int
    created_ts: int
    updated_ts: int = 0
    evidence: str = "{}"  # JSON: of the last halt / completion


class RolloutWaveRow(SQLModel, table=True):
    __tablename__ = "proj_rollout_waves"
    rollout: str = Field(primary_key=True)
    wave: int = Field(primary_key=True)
    size: int = 0
    state: str = ro.WAVE_PENDING
    started_ts: int = 0
    baking_ts: int = 0
    ended_ts: int = 0
    evidence: str = "{}"  # JSON


class RolloutDeviceRow(SQLModel, table=True):
    __tablename__ = "proj_rollout_devices"
    rollout: str = Field(primary_key=True)
    device: str = Field(primary_key=True, index=True)
    wave: int
    state: str = ro.DEV_PLANNED
    counter: int = 0  # the assignment counter of the rollout's release
    previous_model: str = ""
    previous_version: str = ""
    rollback_counter: int = 0
    rollback_state: str = ""  # "", assigned, applied, failed, reverted
    reason: str = ""
    updated_ts: int = 0


TAGS: Table = SQLModel.metadata.tables[DeviceTagRow.__tablename__]
ROLLOUTS: Table = SQLModel.metadata.tables[RolloutRow.__tablename__]
WAVES: Table = SQLModel.metadata.tables[RolloutWaveRow.__tablename__]
ROLLOUT_DEVICES: Table = SQLModel.metadata.tables[RolloutDeviceRow.__tablename__]
int64_columns(TAGS, ROLLOUTS, WAVES, ROLLOUT_DEVICES)

TABLES: tuple[Table, ...] = (TAGS, ROLLOUTS, WAVES, ROLLOUT_DEVICES)


# ---------------------------------------------------------------- fold


def _tagged(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    values = {"device_group": str(p.get("group", "")), "tags": json_text(p.get("tags", {})),
              "updated_seq": entry.seq}
    exists = conn.execute(select(TAGS.c.device).where(TAGS.c.device == p["device"])).first()
    if exists is None:
        conn.execute(insert(TAGS).values(device=p["device"], **values))
    else:
        conn.execute(update(TAGS).where(TAGS.c.device == p["device"]).values(**values))


def _rollout_update(conn: Connection, entry: Entry, rollout: str, **values: Any) -> None:
    conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.rollout == rollout)
                 .values(updated_ts=entry.ts, **values))


def _wave_update(conn: Connection, rollout: str, wave: int, **values: Any) -> None:
    conn.execute(update(WAVES).where(WAVES.c.rollout == rollout, WAVES.c.wave == wave)
                 .values(**values))


def _devices_update(conn: Connection, rollout: str, devices: list[str], **values: Any) -> None:
    if devices:
        conn.execute(update(ROLLOUT_DEVICES).where(
            ROLLOUT_DEVICES.c.rollout == rollout, ROLLOUT_DEVICES.c.device.in_(devices)
        ).values(**values))


def _created(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    rollout = p["rollout"]
    conn.execute(insert(ROLLOUTS).values(
        rollout=rollout, model=p["model"], version=p["version"], digest=p["digest"],
        manifest_hash=p["manifest_hash"], target=p["target"], waves=json_text(p["waves"]),
        policy=json_text(p["policy"]), state=ro.CREATED, creator=entry.actor,
        created_seq=entry.seq, created_ts=entry.ts, updated_ts=entry.ts,
    ))
    devices: list[str] = list(p["devices"])
    start = 0
    for index, size in enumerate(p["wave_sizes"]):
        conn.execute(insert(WAVES).values(rollout=rollout, wave=index, size=size))
        for device in devices[start:start + size]:
            conn.execute(insert(ROLLOUT_DEVICES).values(
                rollout=rollout, device=device, wave=index, updated_ts=entry.ts))
        start += size


def _state(state: str) -> Any:
    def handler(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
        values: dict[str, Any] = {"state": state}
        if "reason" in p:
            values["reason"] = str(p["reason"])
        if "evidence" in p:
            values["evidence"] = json_text(p["evidence"])
        _rollout_update(conn, entry, p["rollout"], **values)

    return handler


def _wave_started(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _rollout_update(conn, entry, p["rollout"], current_wave=p["wave"])
    _wave_update(conn, p["rollout"], p["wave"], state=ro.WAVE_ROLLING, started_ts=entry.ts)


def _wave_baking(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _wave_update(conn, p["rollout"], p["wave"], state=ro.WAVE_BAKING, baking_ts=entry.ts,
                 evidence=json_text(p["evidence"]))


def _wave_completed(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _wave_update(conn, p["rollout"], p["wave"], state=ro.WAVE_DONE, ended_ts=entry.ts,
                 evidence=json_text(p["evidence"]))


def _halted(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _state(ro.HALTED)(conn, entry, p)
    if p.get("wave", -1) >= 0:
        _wave_update(conn, p["rollout"], p["wave"], state=ro.WAVE_HALTED, ended_ts=entry.ts,
                     evidence=json_text(p["evidence"]))


def _timed_out(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(update(ROLLOUT_DEVICES).where(
        ROLLOUT_DEVICES.c.rollout == p["rollout"], ROLLOUT_DEVICES.c.device.in_(p["devices"]),
        ROLLOUT_DEVICES.c.state == ro.DEV_ASSIGNED,
    ).values(state=ro.DEV_TIMED_OUT, reason=f"no report within {p['deadline_s']} s",
             updated_ts=entry.ts))


def _device_added(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    conn.execute(insert(ROLLOUT_DEVICES).values(
        rollout=p["rollout"], device=p["device"], wave=p["wave"], updated_ts=entry.ts))
    wave = conn.execute(select(WAVES.c.size).where(
        WAVES.c.rollout == p["rollout"], WAVES.c.wave == p["wave"])).scalar_one()
    _wave_update(conn, p["rollout"], p["wave"], size=wave + 1)


def _rolled_back(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    _state(ro.ROLLED_BACK)(conn, entry, p)


def _device_revoked(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    """A device revoked while an active rollout has not heard its outcome leaves it: it
    is not assigned, does not time out, and does not count in its wave."""
    active = select(ROLLOUTS.c.rollout).where(ROLLOUTS.c.state.in_(ro.ACTIVE_STATES))
    conn.execute(update(ROLLOUT_DEVICES).where(
        ROLLOUT_DEVICES.c.device == p["device"],
        ROLLOUT_DEVICES.c.state.in_((ro.DEV_PLANNED, ro.DEV_ASSIGNED)),
        ROLLOUT_DEVICES.c.rollout.in_(active),
    ).values(state=ro.DEV_REVOKED, reason="device revoked", updated_ts=entry.ts))


def _assigned(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
    rollout = p.get("rollout")
    if not isinstance(rollout, str):
        return
    if p.get("rollback"):
        _devices_update(conn, rollout, [p["device"]], state=ro.DEV_ROLLED_BACK,
                        rollback_counter=p["counter"], rollback_state=ro.DEV_ASSIGNED,
                        updated_ts=entry.ts)
        return
    _devices_update(conn, rollout, [p["device"]], state=ro.DEV_ASSIGNED, counter=p["counter"],
                    previous_model=str(p.get("previous_model", "")),
                    previous_version=str(p.get("previous_version", "")), updated_ts=entry.ts)


def _report(outcome: str) -> Any:
    def handler(conn: Connection, entry: Entry, p: dict[str, Any]) -> None:
        device, counter = p["device"], p["counter"]
        reason = str(p.get("reason", ""))[:500]
        rows = conn.execute(select(ROLLOUT_DEVICES).where(
            ROLLOUT_DEVICES.c.device == device,
            (ROLLOUT_DEVICES.c.counter == counter)
            | (ROLLOUT_DEVICES.c.rollback_counter == counter),
        )).mappings().all()
        for row in rows:
            key = and_(ROLLOUT_DEVICES.c.rollout == row["rollout"],
                       ROLLOUT_DEVICES.c.device == device)
            if row["rollback_counter"] == counter:
                conn.execute(update(ROLLOUT_DEVICES).where(key).values(
                    rollback_state=outcome, updated_ts=entry.ts))
            elif row["state"] in (ro.DEV_ASSIGNED, ro.DEV_APPLIED):
                # applied -> reverted happens when the agent's health window fails.
                conn.execute(update(ROLLOUT_DEVICES).where(key).values(
                    state=outcome, reason=reason, updated_ts=entry.ts))
            elif row["state"] == ro.DEV_TIMED_OUT:
                conn.execute(update(ROLLOUT_DEVICES).where(key).values(
                    reason=f"{row['reason']}; late report: {outcome}"[:500],
                    updated_ts=entry.ts))

    return handler


Handler = Callable[[Connection, Entry, dict[str, Any]], None]
HANDLERS: dict[str, Handler] = {
    ev.DEVICE_TAGGED: _tagged,
    ev.ROLLOUT_CREATED: _created,
    ev.ROLLOUT_STARTED: _state(ro.RUNNING),
    ev.ROLLOUT_PAUSED: _state(ro.PAUSED),
    ev.ROLLOUT_RESUMED: _state(ro.RUNNING),
    ev.ROLLOUT_ABORTED: _state(ro.ABORTED),
    ev.ROLLOUT_WAVE_STARTED: _wave_started,
    ev.ROLLOUT_WAVE_BAKING: _wave_baking,
    ev.ROLLOUT_WAVE_COMPLETED: _wave_completed,
    ev.ROLLOUT_DEVICES_TIMED_OUT: _timed_out,
    ev.ROLLOUT_DEVICE_ADDED: _device_added,
    ev.ROLLOUT_HALTED: _halted,
    ev.ROLLOUT_COMPLETED: _state(ro.COMPLETED),
    ev.ROLLOUT_ROLLED_BACK: _rolled_back,
    ev.DEVICE_REVOKED: _device_revoked,
    ev.DEVICE_ASSIGNED: _assigned,
    ev.DEVICE_UPDATE_APPLIED: _report(ro.DEV_APPLIED),
    ev.DEVICE_UPDATE_FAILED: _report(ro.DEV_FAILED),
    ev.DEVICE_UPDATE_REVERTED: _report(ro.DEV_REVERTED),
}


# ---------------------------------------------------------------- reads

_JSON = ("waves", "policy", "evidence", "tags")


def device_tags(conn: Connection) -> dict[str, tuple[str, dict[str, str]]]:
    return {r.device: (r.device_group, json.loads(r.tags)) for r in conn.execute(select(TAGS))}


def get_rollout(conn: Connection, rollout: str) -> dict[str, Any] | None:
    row = conn.execute(select(ROLLOUTS).where(ROLLOUTS.c.rollout == rollout)).mappings().first()
    return row_dict(row, _JSON) if row is not None else None


def list_rollouts(conn: Connection, states: tuple[str, ...] | None = None
                  ) -> list[dict[str, Any]]:
    query = select(ROLLOUTS).order_by(ROLLOUTS.c.created_seq)
    if states is not None:
        query = query.where(ROLLOUTS.c.state.in_(states))
    return [row_dict(r, _JSON) for r in conn.execute(query).mappings()]


def list_waves(conn: Connection, rollout: str) -> list[dict[str, Any]]:
    query = select(WAVES).where(WAVES.c.rollout == rollout).order_by(WAVES.c.wave)
    return [row_dict(r, _JSON) for r in conn.execute(query).mappings()]


def list_rollout_devices(conn: Connection, rollout: str) -> list[dict[str, Any]]:
    query = (select(ROLLOUT_DEVICES).where(ROLLOUT_DEVICES.c.rollout == rollout)
             .order_by(ROLLOUT_DEVICES.c.wave, ROLLOUT_DEVICES.c.device))
    return [dict(r) for r in conn.execute(query).mappings()]


def device_state_counts(conn: Connection) -> dict[str, dict[str, int]]:
    """rollout -> {device state: how many}, counted by the database (`hub rollout list`
    is polled while a 1,000-device rollout runs)."""
    t = ROLLOUT_DEVICES
    out: dict[str, dict[str, int]] = {}
    for rollout, state, n in conn.execute(
            select(t.c.rollout, t.c.state, func.count()).group_by(t.c.rollout, t.c.state)):
        out.setdefault(rollout, {})[state] = int(n)
    return out


def wave_state_counts(conn: Connection, rollout: str) -> dict[int, dict[str, int]]:
    """wave -> {device state: how many} of one rollout, counted by the database (the
    dashboard polls it; rules.wave_tally makes the tally of it)."""
    t = ROLLOUT_DEVICES
    out: dict[int, dict[str, int]] = {}
    for wave, state, n in conn.execute(
            select(t.c.wave, t.c.state, func.count()).where(t.c.rollout == rollout)
            .group_by(t.c.wave, t.c.state)):
        out.setdefault(int(wave), {})[state] = int(n)
    return out


def wave_counts(conn: Connection) -> dict[str, int]:
    """rollout -> number of waves."""
    rows = conn.execute(select(WAVES.c.rollout, func.count()).group_by(WAVES.c.rollout))
    return {rollout: int(n) for rollout, n in rows}


def active_rollout_of(conn: Connection) -> dict[str, str]:
    """device -> the active rollout it belongs to."""
    query = (select(ROLLOUT_DEVICES.c.device, ROLLOUT_DEVICES.c.rollout)
             .select_from(ROLLOUT_DEVICES.join(
                 ROLLOUTS, ROLLOUTS.c.rollout == ROLLOUT_DEVICES.c.rollout))
             .where(ROLLOUTS.c.state.in_(ro.ACTIVE_STATES)))
    return {r.device: r.rollout for r in conn.execute(query)}


def refuse_busy(conn: Connection, devices: list[str], advice: str) -> None:
    """Refuse (RolloutError) if any of `devices` is in an active rollout: one active
    rollout per device. `advice` says what to do instead (`{owner}` names the rollout)."""
    busy = active_rollout_of(conn)
    clash = sorted(d for d in devices if d in busy)
    if not clash:
        return
    owners = sorted({busy[d] for d in clash})
    shown = ", ".join(clash[:5]) + (f" (+{len(clash) - 5} more)" if len(clash) > 5 else "")
    raise ro.RolloutError(
        f"{len(clash)} device(s) are already in active rollout {', '.join(owners)}: {shown}; "
        f"one active rollout per device: {advice.format(owner=owners[0])}")


@dataclass(frozen=True)
class Member:
    wave: int
    device: str
    state: str
    counter: int


def member_rows(conn: Connection, rid: str) -> list[Member]:
    """The rollout's devices: only the four columns a decision needs, as tuples (a
    1,000-device rollout is read every tick while a wave is rolling)."""
    t = ROLLOUT_DEVICES
    rows = conn.execute(select(t.c.wave, t.c.device, t.c.state, t.c.counter)
                        .where(t.c.rollout == rid))
    return [Member(*row) for row in rows]


def wave_views(conn: Connection, rid: str, members: list[Member] | None = None
               ) -> list[ro.WaveView]:
    devices: dict[int, dict[str, str]] = {}
    for m in member_rows(conn, rid) if members is None else members:
        devices.setdefault(m.wave, {})[m.device] = m.state
    return [ro.WaveView(w["wave"], w["state"], devices.get(w["wave"], {}), w["started_ts"],
                        w["baking_ts"])
            for w in list_waves(conn, rid)]


def telemetry_view(conn: Connection, telemetry: TelemetryIngest, rollout: dict[str, Any],
                   members: list[Member] | None = None) -> ro.TelemetryView:
    """The telemetry of a rollout's devices on its release, against the release's
    reference histograms (drift)."""
    if members is None:
        members = member_rows(conn, rollout["rollout"])
    release = governance.get_release(conn, rollout["model"], rollout["version"])
    reference = (release or {}).get("validation", {}).get("reference_histograms", [])
    keys = [(m.device, rollout["digest"], m.counter) for m in members if m.counter]
    return telemetry.view(keys, reference)

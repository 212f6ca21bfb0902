"""Read verbs for rollouts and telemetry (`rollouts`, `rollout.status`, `telemetry`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.handlers import CommandError
from hub.rollouts import state as rs
from hub.rollouts.controller import wave_views
from hub.wire import MAX_TELEMETRY_PAGE, TELEMETRY_PAGE
from ledger.entry import Entry
from ledger.storage.schema import ENTRIES

if TYPE_CHECKING:
    from hub.service.app import HubService

RECENT_EVENTS = 30


STATUS_DEVICES_PAGE = 500


def whole_number(body: dict[str, Any], key: str, default: int, low: int, high: int | None) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise CommandError(f"invalid {key} {value!r}: expected a whole number {bounds}")
    return value


def read_handlers(hub: HubService) -> dict[str, Callable[[VerifiedCommand], Any]]:
    def rollouts(cmd: VerifiedCommand) -> Any:
        out = []
        with hub.store.engine.connect() as conn:
            counts = rs.device_state_counts(conn)
            waves = rs.wave_counts(conn)
            for r in rs.list_rollouts(conn):
                states = counts.get(r["rollout"], {})
                out.append({
                    **{k: r[k] for k in ("rollout", "model", "version", "target", "state",
                                         "current_wave", "created_ts", "updated_ts",
                                         "reason")},
                    "waves": waves.get(r["rollout"], 0),
                    "devices": sum(states.values()),
                    "counts": dict(sorted(states.items())),
                })
        return out

    def status(cmd: VerifiedCommand) -> Any:
        rid = cmd.body.get("rollout")
        if not isinstance(rid, str) or not rid:
            raise CommandError("missing 'rollout'")
        status = rollout_status(hub, rid)
        # Per-device rows only when asked, a page at a time: `--watch` polls this every
        # second, and a 1,000-device list is ~200 KB.
        devices = status.pop("devices")
        status["device_count"] = len(devices)
        if cmd.body.get("devices"):
            limit = whole_number(cmd.body, "limit", STATUS_DEVICES_PAGE, 1,
                                 STATUS_DEVICES_PAGE)
            offset = whole_number(cmd.body, "offset", 0, 0, None)
            status["devices"] = devices[offset:offset + limit]
            status["next_offset"] = offset + limit if offset + limit < len(devices) else None
        return status

    def telemetry(cmd: VerifiedCommand) -> Any:
        device = cmd.body.get("device")
        t = hub.telemetry
        fleet = [{"model": m, "version": v, "inferences": n, "errors": e}
                 for (m, v), (n, e) in sorted(t.totals_by_model().items())]
        out: dict[str, Any] = {
            "fleet": fleet, "windows": t.windows_total, "duplicates": t.duplicates_total,
            "dropped": t.dropped_total, "ingest_lag_s": t.last_lag_s}
        if isinstance(device, str):
            return {**out, "devices": t.device_rows(device)}
        # The fleet view is paged: every device's rows in one reply pass the NATS
        # payload limit (256 KiB by default) at about 500 devices.
        sort = cmd.body.get("sort", "error-rate")
        limit = whole_number(cmd.body, "limit", TELEMETRY_PAGE, 1, MAX_TELEMETRY_PAGE)
        offset = whole_number(cmd.body, "offset", 0, 0, None)
        try:
            total, rows = t.device_summaries(str(sort), limit, offset)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return {**out, "device_count": total, "sort": sort, "offset": offset,
                "limit": limit, "devices": rows}

    return {"rollouts": rollouts, "rollout.status": status, "telemetry": telemetry}


def rollout_status(hub: HubService, rid: str) -> dict[str, Any]:
    with hub.store.engine.connect() as conn:
        rollout = rs.get_rollout(conn, rid)
        if rollout is None:
            raise CommandError(f"no rollout {rid}; see `hub rollout list`")
        waves = rs.list_waves(conn, rid)
        views = {w.index: w for w in wave_views(conn, rid)}
        devices = rs.list_rollout_devices(conn, rid)
        telemetry = hub.controller.telemetry_view(conn, rollout).evidence()
        rows = conn.execute(
            select(ENTRIES.c.body, ENTRIES.c.prev, ENTRIES.c.hash)
            .where(ENTRIES.c.subject == ev.rollout_subject(rid))
            .order_by(ENTRIES.c.seq.desc()).limit(RECENT_EVENTS)).all()
    events = []
    for body, prev, hash_ in reversed(rows):
        e = Entry.from_body(body, prev, hash_)
        payload = {k: v for k, v in e.payload.items() if k not in ("command", "devices")}
        events.append({"seq": e.seq, "ts": e.ts, "kind": e.kind, "actor": e.actor,
                       "payload": payload})
    return {
        "rollout": rollout,
        "waves": [{**w, "counts": views[w["wave"]].counts() if w["wave"] in views else {}}
                  for w in waves],
        "devices": devices,
        "telemetry": telemetry,
        "events": events,
    }

"""Read verbs for rollouts and telemetry (`rollouts`, `rollout.status`, `telemetry`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Verbs
from hub.rollouts import state as rs
from hub.rollouts.state import telemetry_view, wave_views
from hub.telemetry.ingest import TelemetryIngest
from hub.wire import MAX_TELEMETRY_PAGE, TELEMETRY_PAGE
from ledger.storage import query

RECENT_EVENTS = 30


STATUS_DEVICES_PAGE = 500


class RolloutReads:
    def __init__(self, engine: Engine, telemetry: TelemetryIngest) -> None:
        self.engine = engine
        self.telemetry = telemetry

    def handlers(self) -> Verbs:
        return Verbs(reads={"rollouts": self.rollouts, "rollout.status": self.status,
                            "telemetry": self.telemetry_summary})

    def rollouts(self, cmd: VerifiedCommand) -> Any:
        out = []
        with self.engine.connect() as conn:
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

    def status(self, cmd: VerifiedCommand) -> Any:
        rid = cmd.body.get("rollout")
        if not isinstance(rid, str) or not rid:
            raise CommandError("missing 'rollout'")
        status = self.rollout_status(rid)
        # Per-device rows only when asked, a page at a time: `--watch` polls this every
        # second, and a 1,000-device list is ~200 KB.
        devices = status.pop("devices")
        status["device_count"] = len(devices)
        if cmd.body.get("devices"):
            body = Body(cmd.body)
            limit = body.whole_number("limit", STATUS_DEVICES_PAGE, 1, STATUS_DEVICES_PAGE)
            offset = body.whole_number("offset", 0, 0, None)
            status["devices"] = devices[offset:offset + limit]
            status["next_offset"] = offset + limit if offset + limit < len(devices) else None
        return status

    def telemetry_summary(self, cmd: VerifiedCommand) -> Any:
        device = cmd.body.get("device")
        t = self.telemetry
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
        body = Body(cmd.body)
        limit = body.whole_number("limit", TELEMETRY_PAGE, 1, MAX_TELEMETRY_PAGE)
        offset = body.whole_number("offset", 0, 0, None)
        try:
            total, rows = t.device_summaries(str(sort), limit, offset)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return {**out, "device_count": total, "sort": sort, "offset": offset,
                "limit": limit, "devices": rows}

    def rollout_status(self, rid: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            rollout = rs.get_rollout(conn, rid)
            if rollout is None:
                raise CommandError(f"no rollout {rid}; see `hub rollout list`")
            waves = rs.list_waves(conn, rid)
            views = {w.index: w for w in wave_views(conn, rid)}
            devices = rs.list_rollout_devices(conn, rid)
            telemetry = telemetry_view(conn, self.telemetry, rollout).evidence()
            recent = query.select_entries(
                conn, query.EntryFilter(subject=ev.rollout_subject(rid)), RECENT_EVENTS,
                newest=True)
        events = []
        for e in recent:
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

"""Read verbs about devices: `devices` (one page of the fleet), `device.show` (one
device: state, what it runs, tags, last reports, telemetry) and `device.history` (every
ledger event about a device, with its enrolled key), and the check of a recorded
report's signature that `hub device history` shows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, select

from edge_agent.protocol import (
    ProtocolError,
    check_device_id,
    read_report,
    report_signed_by,
)
from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Verbs
from hub.devices import state as device_state
from hub.rollouts import state as rollout_state
from hub.rollouts.rules import label_clauses, parse_selector
from ledger.encoding import canonical_encode
from ledger.storage import query

# `devices` pages: rows per page at most, and the encoded rows' budget per reply (under
# the 256 KiB a client accepts; a row with a long last error is ~1.5 KiB).
DEVICES_PAGE = 500
DEVICES_REPLY_BYTES = 192 * 1024


class DeviceReads:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handlers(self) -> Verbs:
        return Verbs(reads={"devices": self.devices, "device.show": self.show,
                            "device.history": self.history})

    def devices(self, cmd: VerifiedCommand) -> Any:
        """One page of the fleet (a 1,000-device fleet is over the reply size limit in
        one piece): up to `limit` rows from `offset`, cut short to stay under
        DEVICES_REPLY_BYTES; `next_offset` is where the next page starts (None: done)."""
        state = cmd.body.get("state")
        if state is not None and not isinstance(state, str):
            raise CommandError("'state' must be text")
        body = Body(cmd.body)
        limit = body.whole_number("limit", DEVICES_PAGE, 1, DEVICES_PAGE)
        offset = body.whole_number("offset", 0, 0, None)
        labels = cmd.body.get("labels")
        if labels is not None and not isinstance(labels, str):
            raise CommandError("'labels' must be text: KEY=VALUE,...")
        with self.engine.connect() as conn:
            if labels:
                # Only devices whose group and tags match (`group=prod,site=a`).
                selector = parse_selector(label_clauses(labels))
                tags = rollout_state.device_tags(conn)
                matched = [r for r in device_state.list_devices(conn, state)
                           if selector.matches(r["device"], *tags.get(r["device"], ("", {})))]
                rows = matched[offset:offset + limit + 1]
                states: dict[str, int] = {}  # of the matching devices
                for r in matched:
                    states[r["state"]] = states.get(r["state"], 0) + 1
            else:
                rows = device_state.list_devices(conn, state, offset, limit + 1)
                states = device_state.device_states(conn)
        more = len(rows) > limit
        kept: list[dict[str, Any]] = []
        size = 0
        for row in rows[:limit]:
            size += len(canonical_encode(row))
            if kept and size > DEVICES_REPLY_BYTES:
                more = True
                break
            kept.append(row)
        total = states.get(state, 0) if state is not None else sum(states.values())
        return {"devices": kept, "device_count": total, "states": states, "offset": offset,
                "next_offset": offset + len(kept) if more else None}

    def history(self, cmd: VerifiedCommand) -> Any:
        with self.engine.connect() as conn:
            return device_history(conn, cmd.body.get("device"))

    def show(self, cmd: VerifiedCommand) -> Any:
        with self.engine.connect() as conn:
            return device_show(conn, cmd.body.get("device"))


REPORT_KINDS = (ev.DEVICE_UPDATE_APPLIED, ev.DEVICE_UPDATE_FAILED, ev.DEVICE_UPDATE_REVERTED)
LAST_REPORTS = 5


def device_show(conn: Connection, device: Any) -> dict[str, Any]:
    """One device for `hub device show`: its row (state, assigned and running release),
    group and tags, its telemetry counters, the active rollout it is in, and its last
    LAST_REPORTS status reports as the ledger recorded them (times: hub ns)."""
    if not isinstance(device, str):
        raise CommandError("missing 'device'")
    check_device_id(device)
    row = device_state.get_device(conn, device)
    if row is None:
        raise CommandError(f"no device {device} is enrolled; see `hub devices`")
    group, tags = rollout_state.device_tags(conn).get(device, ("", {}))
    t = device_state.TELEMETRY
    telemetry = conn.execute(select(t).where(t.c.device == device)).mappings().first()
    reports = query.select_entries(
        conn, query.EntryFilter(subject=ev.device_subject(device), kinds=REPORT_KINDS),
        limit=LAST_REPORTS, newest=True)
    return {
        "device": row, "group": group, "tags": tags,
        "telemetry": dict(telemetry) if telemetry is not None else None,
        "rollout": rollout_state.active_rollout_of(conn).get(device),
        "reports": [{"seq": e.seq, "ts": e.ts, "kind": e.kind,
                     **{k: e.payload.get(k) for k in
                        ("model", "version", "digest", "counter", "reason")}}
                    for e in reports],
    }


def device_history(conn: Connection, device: Any) -> dict[str, Any]:
    """Every ledger event about a device, and its enrolled public key, for `hub device
    history` (which checks the report signatures itself)."""
    if not isinstance(device, str):
        raise CommandError("missing 'device'")
    check_device_id(device)
    row = device_state.get_device(conn, device)
    if row is None:
        raise CommandError(f"no device {device} is enrolled")
    entries = query.select_entries(
        conn, query.EntryFilter(subject=ev.device_subject(device)), limit=None)
    events = [{"seq": e.seq, "ts": e.ts, "kind": e.kind, "actor": e.actor,
               "payload": e.payload} for e in entries]
    return {"device": device, "public": row.get("public"), "events": events}


def report_signature(payload: dict[str, Any], public: bytes | None) -> str:
    """'valid', 'INVALID' or 'unsigned' for a device.update_* event's `report`."""
    data = payload.get("report")
    if not isinstance(data, bytes):
        return "unsigned"
    if public is None:
        return "INVALID"
    try:
        report, envelope = read_report(data)
    except ProtocolError:
        return "INVALID"
    if envelope is None or not report_signed_by(envelope, public):
        return "INVALID"
    # The ledger's fields must be the ones the device signed.
    same = all(payload.get(k) == getattr(report, k) for k in
               ("device", "model", "version", "digest", "counter", "boot"))
    return "valid" if same else "INVALID"

"""Operator commands for targeting and rollouts, and the assignment builder the
controller shares with them.

Write verbs (`device.tag`, `rollout.create|start|pause|resume|abort|rollback`) check the
command against the projections and return events (hub.api.Outcome); the hub appends
them under its single-writer lock. Assignments for a rollout carry `rollout` = the
rollout id, are in the ledger before they are put in KV, and name the release each
device ran before (`previous_model`/`previous_version`) so a rollback knows where to go.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from edge_agent import protocol as proto
from hub import events as ev
from hub import fold as proj
from hub.commands.envelope import VerifiedCommand
from hub.commands.handlers import CommandError, Outcome
from hub.governance import rules as lc
from hub.rollouts import rules as ro
from hub.rollouts import state as rs
from ledger.signing import SigningKey
from ledger.storage.schema import ENTRIES
from ledger.storage.store import NewEvent

DAY_NS = 24 * 3600 * 10**9
PutAssignment = Callable[[str, bytes], Awaitable[None]]


def next_seq(conn: Connection) -> int:
    head = conn.execute(select(func.max(ENTRIES.c.seq))).scalar()
    return 0 if head is None else int(head) + 1


@dataclass(frozen=True)
class AssignmentIssuer:
    """Signs per-device assignments with the director key."""

    signers: Callable[[], list[SigningKey]]  # the director key(s) in force now
    ttl_days: int

    def issue(self, conn: Connection, actor: str, rollout: str, devices: list[str],
              release: dict[str, Any], put: PutAssignment, extra: dict[str, Any] | None = None,
              previous: bool = True) -> tuple[list[NewEvent], list[Callable[[], Awaitable[None]]]]:
        """`device.assigned` events (and their KV writes) of `release` for `devices`."""
        now = time.time_ns()
        events: list[NewEvent] = []
        writes: list[Callable[[], Awaitable[None]]] = []
        rows = proj.get_devices(conn, list(devices))  # one query for a whole wave
        signers = self.signers() if devices else []
        for device in devices:
            row = rows.get(device)
            if row is None:
                continue
            counter = int(row["counter"]) + 1
            assignment = proto.Assignment(
                device=device, model=release["name"], version=release["version"],
                digest=release["digest"], manifest_hash=release["manifest_hash"],
                counter=counter, rollout=rollout, issued_at=now,
                expires=now + self.ttl_days * DAY_NS,
            )
            envelope = proto.SignedEnvelope.sign(
                assignment.to_map(), proto.DOMAIN_ASSIGNMENT, signers
            ).encode()
            payload: dict[str, Any] = {
                "device": device, "deployment": rollout, "rollout": rollout,
                "model": release["name"], "version": release["version"],
                "digest": release["digest"], "counter": counter,
                "manifest_hash": release["manifest_hash"], "assignment": envelope,
                **(extra or {}),
            }
            if previous:
                payload["previous_model"] = row["model"] or ""
                payload["previous_version"] = row["version"] or ""
            events.append(NewEvent(ev.DEVICE_ASSIGNED, actor, ev.device_subject(device),
                                   payload))
            writes.append(_bind(put, device, envelope))
        return events, writes


def _bind(fn: PutAssignment, key: str, value: bytes) -> Callable[[], Awaitable[None]]:
    return lambda: fn(key, value)


def rollout_release(rollout: dict[str, Any]) -> dict[str, Any]:
    return {"name": rollout["model"], "version": rollout["version"],
            "digest": rollout["digest"], "manifest_hash": rollout["manifest_hash"]}


def rollback_events(conn: Connection, issuer: AssignmentIssuer, rollout: dict[str, Any],
                    actor: str, reason: str, auto: bool, put: PutAssignment,
                    first: NewEvent | None = None,
                    ) -> tuple[list[NewEvent], list[Callable[[], Awaitable[None]]], dict[str, Any]]:
    """Give every device that took (or may still take) the rollout's release its
    previous release again; devices that failed or reverted already run it."""
    rid = rollout["rollout"]
    targets: dict[tuple[str, str], list[str]] = {}
    skipped: dict[str, str] = {}
    for row in rs.list_rollout_devices(conn, rid):
        if row["state"] not in (ro.DEV_ASSIGNED, ro.DEV_APPLIED, ro.DEV_TIMED_OUT):
            continue
        prev = (row["previous_model"], row["previous_version"])
        if not all(prev):
            skipped[row["device"]] = "no previous release to go back to"
            continue
        targets.setdefault(prev, []).append(row["device"])
    releases: dict[tuple[str, str], dict[str, Any]] = {}
    for (name, version), group in sorted(targets.items()):
        release = proj.get_release(conn, name, version)
        if release is None or release["state"] not in (lc.RELEASED, lc.DEPRECATED):
            for device in group:
                skipped[device] = f"previous release {name}/{version} is not deployable"
        else:
            releases[(name, version)] = release
    devices = sorted(d for key in releases for d in targets[key])
    events: list[NewEvent] = [first] if first is not None else []
    events.append(NewEvent(ev.ROLLOUT_ROLLED_BACK, actor, ev.rollout_subject(rid), {
        "rollout": rid, "reason": reason, "auto": auto, "devices": devices,
        "skipped": dict(sorted(skipped.items()))}))
    writes: list[Callable[[], Awaitable[None]]] = []
    for key, release in releases.items():
        more, w = issuer.issue(conn, actor, rid, sorted(targets[key]), release, put,
                               extra={"rollback": True}, previous=False)
        events += more
        writes += w
    return events, writes, {"rollout": rid, "devices": devices, "skipped": skipped}


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"missing or invalid {key!r}: expected text")
    return value


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandError(f"invalid {key!r}: expected a number")
    return float(value)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


class RolloutCommands:
    def __init__(self, issuer: AssignmentIssuer, put: PutAssignment) -> None:
        self.issuer = issuer
        self.put = put

    def handlers(self) -> dict[str, Callable[[Connection, VerifiedCommand], Any]]:
        return {
            "device.tag": self.device_tag,
            "rollout.create": self.create,
            "rollout.start": self._simple("start", ev.ROLLOUT_STARTED),
            "rollout.pause": self._simple("pause", ev.ROLLOUT_PAUSED),
            "rollout.resume": self._simple("resume", ev.ROLLOUT_RESUMED),
            "rollout.abort": self._simple("abort", ev.ROLLOUT_ABORTED),
            "rollout.rollback": self.rollback,
        }

    @staticmethod
    def _event(cmd: VerifiedCommand, kind: str, subject: str, payload: dict[str, Any]
               ) -> NewEvent:
        return NewEvent(kind, cmd.operator.keyid, subject, {**payload, "command": cmd.envelope})

    # ------------------------------------------------------------ targeting

    def device_tag(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        device = _text(cmd.body, "device")
        if proj.get_device(conn, device) is None:
            raise CommandError(f"unknown device {device}; enroll it first")
        group, tags = rs.device_tags(conn).get(device, ("", {}))
        new_tags = dict(tags)
        try:
            if "group" in cmd.body:
                group = str(cmd.body["group"])
                ro.check_group(group)
            raw = cmd.body.get("tags", {})
            if not isinstance(raw, dict):
                raise CommandError("'tags' must be a map of text to text")
            for key, value in raw.items():
                ro.check_tag(str(key), str(value))
                new_tags[str(key)] = str(value)
            for key in cmd.body.get("untag", []) or []:
                new_tags.pop(str(key), None)
        except ro.RolloutError as exc:
            raise CommandError(str(exc)) from exc
        payload = {"device": device, "group": group, "tags": dict(sorted(new_tags.items()))}
        return Outcome([self._event(cmd, ev.DEVICE_TAGGED, ev.device_subject(device), payload)],
                       payload)

    # ------------------------------------------------------------ rollouts

    def create(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        body = cmd.body
        name, version = _text(body, "model"), _text(body, "version")
        release = proj.get_release(conn, name, version)
        if release is None:
            raise CommandError(f"model {name}/{version} is not registered; see `hub model list`")
        try:
            lc.check_transition("deploy", release["state"], name, version)
            selector = ro.parse_selector(_text(body, "target"))
            waves = ro.parse_waves(body.get("waves", "100%"))
            policy = ro.Policy(
                min_success=_or(_number(body, "min_success"), ro.Policy.min_success),
                max_failure=_or(_number(body, "max_failure"), ro.Policy.max_failure),
                bake_s=ro.parse_duration(body.get("bake", 0)),
                max_error_rate=_number(body, "max_error_rate"),
                max_p95_ms=_number(body, "max_p95_ms"),
                max_psi=_number(body, "max_psi"),
                deadline_s=ro.parse_duration(body.get("deadline", "10m")),
                auto_rollback=bool(body.get("auto_rollback", False)),
                min_inferences=int(body.get("min_inferences", ro.Policy.min_inferences)),
            )
        except (lc.TransitionRefused, ro.RolloutError) as exc:
            raise CommandError(str(exc)) from exc
        tags = rs.device_tags(conn)
        targets = [d["device"] for d in proj.list_devices(conn)
                   if selector.matches(d["device"], *tags.get(d["device"], ("", {})))]
        if not targets:
            raise CommandError(f"no enrolled device matches target {selector.text!r}")
        busy = rs.active_rollout_of(conn)
        clash = sorted(d for d in targets if d in busy)
        if clash:
            owners = sorted({busy[d] for d in clash})
            shown = ", ".join(clash[:5]) + (f" (+{len(clash) - 5} more)" if len(clash) > 5 else "")
            raise CommandError(
                f"{len(clash)} target device(s) are already in active rollout(s) "
                f"{', '.join(owners)}: {shown}; one active rollout per device: finish, abort "
                f"or roll back {owners[0]} first, or narrow --target"
            )
        rid = f"r-{next_seq(conn)}"
        plan = ro.split_waves(rid, targets, waves)
        payload = {
            "rollout": rid, "model": name, "version": version, "digest": release["digest"],
            "manifest_hash": release["manifest_hash"], "target": selector.text,
            "waves": waves, "wave_sizes": [len(w) for w in plan],
            "devices": [d for w in plan for d in w], "policy": policy.to_payload(),
        }
        event = self._event(cmd, ev.ROLLOUT_CREATED, ev.rollout_subject(rid), payload)
        return Outcome([event], {"rollout": rid, "devices": len(targets),
                                 "waves": [len(w) for w in plan], "state": ro.CREATED})

    def _load(self, conn: Connection, cmd: VerifiedCommand, action: str) -> dict[str, Any]:
        rid = _text(cmd.body, "rollout")
        rollout = rs.get_rollout(conn, rid)
        if rollout is None:
            raise CommandError(f"no rollout {rid}; see `hub rollout list`")
        try:
            ro.check_transition(action, rollout["state"], rid)
        except ro.RolloutError as exc:
            raise CommandError(str(exc)) from exc
        return rollout

    def _simple(self, action: str, kind: str) -> Callable[[Connection, VerifiedCommand],
                                                           Outcome]:
        def handler(conn: Connection, cmd: VerifiedCommand) -> Outcome:
            rollout = self._load(conn, cmd, action)
            payload: dict[str, Any] = {"rollout": rollout["rollout"]}
            if kind in (ev.ROLLOUT_PAUSED, ev.ROLLOUT_ABORTED):
                payload["reason"] = str(cmd.body.get("reason", ""))
            event = self._event(cmd, kind, ev.rollout_subject(rollout["rollout"]), payload)
            return Outcome([event], {"rollout": rollout["rollout"],
                                     "state": kind.split(".")[1]})

        return handler

    def rollback(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        rollout = self._load(conn, cmd, "rollback")
        reason = str(cmd.body.get("reason", "")) or "operator rollback"
        events, writes, result = rollback_events(
            conn, self.issuer, rollout, cmd.operator.keyid, reason, False, self.put)
        events[0] = NewEvent(events[0].kind, events[0].actor, events[0].subject,
                             {**events[0].payload, "command": cmd.envelope})
        return Outcome(events, {**result, "state": ro.ROLLED_BACK}, writes)

"""Operator commands for targeting and rollouts, and the rollback plan the controller
shares with them.

Write verbs (`device.tag`, `rollout.create|start|pause|resume|abort|rollback`) check the
command against the state and return events (hub.commands.outcome.Outcome); the router
appends them under the single writer's lock. Assignments for a rollout carry `rollout` = the
rollout id, are in the ledger before they are put in KV, and name the release each
device ran before (`previous_model`/`previous_version`) so a rollback knows where to go.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Effects, Outcome, Verbs, command_event
from hub.commands.writer import next_seq
from hub.devices import state as device_state
from hub.devices.assignments import AssignmentIssuer, Issued, write_all
from hub.governance import rules as lc
from hub.governance import state as governance
from hub.governance.state import require_release, require_transition
from hub.rollouts import rules as ro
from hub.rollouts import state as rs
from hub.telemetry.drift import blind_outputs, drift_blind_warning
from ledger.storage.store import NewEvent


def rollout_release(rollout: dict[str, Any]) -> dict[str, Any]:
    return {"name": rollout["model"], "version": rollout["version"],
            "digest": rollout["digest"], "manifest_hash": rollout["manifest_hash"]}


def rollback_events(conn: Connection, issuer: AssignmentIssuer, rollout: dict[str, Any],
                    actor: str, reason: str, auto: bool, first: NewEvent | None = None,
                    ) -> tuple[list[NewEvent], Issued, dict[str, Any]]:
    """Give every device that took (or may still take) the rollout's release its
    previous release again; devices that failed or reverted already run it."""
    rid = rollout["rollout"]
    targets: dict[tuple[str, str], list[str]] = {}
    skipped: dict[str, str] = {}
    members = rs.list_rollout_devices(conn, rid)
    devices_now = device_state.get_devices(conn, [row["device"] for row in members])
    for row in members:
        if row["state"] not in (ro.DEV_ASSIGNED, ro.DEV_APPLIED, ro.DEV_TIMED_OUT):
            continue
        now = devices_now.get(row["device"], {})
        if now.get("state") == device_state.REVOKED:
            skipped[row["device"]] = "revoked"
            continue
        # After an abort or completion, a later deploy or rollout may have moved it on.
        if (now.get("assigned_model"), now.get("assigned_version")) != (
                rollout["model"], rollout["version"]):
            skipped[row["device"]] = (f"now assigned {now.get('assigned_model')}/"
                                      f"{now.get('assigned_version')}, not this rollout's "
                                      "release")
            continue
        prev = (row["previous_model"], row["previous_version"])
        if not all(prev):
            skipped[row["device"]] = "no previous release to go back to"
            continue
        targets.setdefault(prev, []).append(row["device"])
    releases: dict[tuple[str, str], dict[str, Any]] = {}
    for (name, version), group in sorted(targets.items()):
        release = governance.get_release(conn, name, version)
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
    issued = Issued()
    for key, release in releases.items():
        more = issuer.issue(conn, actor, rid, sorted(targets[key]), release,
                            extra={"rollback": True}, previous=False)
        issued.events += more.events
        issued.writes += more.writes
    events += issued.events
    return events, issued, {"rollout": rid, "devices": devices, "skipped": skipped}


class RolloutCommands:
    def __init__(self, issuer: AssignmentIssuer, effects: Effects) -> None:
        self.issuer = issuer
        self.effects = effects

    def handlers(self) -> Verbs:
        return Verbs(writes={
            "device.tag": self.device_tag,
            "rollout.create": self.create,
            "rollout.start": self._simple("start", ev.ROLLOUT_STARTED),
            "rollout.pause": self._simple("pause", ev.ROLLOUT_PAUSED),
            "rollout.resume": self._simple("resume", ev.ROLLOUT_RESUMED),
            "rollout.abort": self._simple("abort", ev.ROLLOUT_ABORTED),
            "rollout.rollback": self.rollback,
        })

    # ------------------------------------------------------------ targeting

    def device_tag(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        device = Body(cmd.body).text("device")
        if device_state.get_device(conn, device) is None:
            raise CommandError(f"unknown device {device}; enroll it first")
        group, tags = rs.device_tags(conn).get(device, ("", {}))
        new_tags = dict(tags)
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
        payload = {"device": device, "group": group, "tags": dict(sorted(new_tags.items()))}
        return Outcome([command_event(cmd, ev.DEVICE_TAGGED, ev.device_subject(device), payload)],
                       payload)

    # ------------------------------------------------------------ rollouts

    def create(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        body, fields = cmd.body, Body(cmd.body)
        name, version = fields.text("model"), fields.text("version")
        release = require_release(conn, name, version)
        require_transition("deploy", release)
        target = fields.text("target")
        labels = body.get("labels")
        if labels:
            target = f"{target},{ro.label_clauses(str(labels))}"
        selector = ro.parse_selector(target)
        waves = ro.parse_waves(body.get("waves", "100%"))
        policy = ro.Policy(
            min_success=fields.number("min_success", ro.Policy.min_success),
            max_failure=fields.number("max_failure", ro.Policy.max_failure),
            bake_s=ro.parse_duration(body.get("bake", 0)),
            max_error_rate=fields.number("max_error_rate"),
            max_p95_ms=fields.number("max_p95_ms"),
            max_psi=fields.number("max_psi"),
            deadline_s=ro.parse_duration(body.get("deadline", "10m")),
            auto_rollback=bool(body.get("auto_rollback", False)),
            min_inferences=int(body.get("min_inferences", ro.Policy.min_inferences)),
        )
        if policy.max_psi is not None:
            _refuse_blind_psi_gate(release)
        tags = rs.device_tags(conn)
        matched = [d for d in device_state.list_devices(conn)
                   if selector.matches(d["device"], *tags.get(d["device"], ("", {})))]
        # Revoked devices never enter a rollout (they could only time out and halt it).
        targets = [d["device"] for d in matched if d["state"] != device_state.REVOKED]
        revoked = len(matched) - len(targets)
        if not targets:
            raise CommandError(
                f"no enrolled device matches target {selector.text!r}"
                + (f" ({revoked} revoked device(s) match; they are never targeted)"
                   if revoked else ""))
        rs.refuse_busy(conn, targets,
                       "finish, abort or roll back {owner} first, or narrow --target")
        rid = f"r-{next_seq(conn)}"
        plan = ro.split_waves(rid, targets, waves)
        payload = {
            "rollout": rid, "model": name, "version": version, "digest": release["digest"],
            "manifest_hash": release["manifest_hash"], "target": selector.text,
            "waves": waves, "wave_sizes": [len(w) for w in plan],
            "devices": [d for w in plan for d in w], "policy": policy.to_payload(),
        }
        event = command_event(cmd, ev.ROLLOUT_CREATED, ev.rollout_subject(rid), payload)
        return Outcome([event], {"rollout": rid, "devices": len(targets),
                                 "waves": [len(w) for w in plan], "state": ro.CREATED,
                                 "skipped_revoked": revoked})

    def _load(self, conn: Connection, cmd: VerifiedCommand, action: str) -> dict[str, Any]:
        rid = Body(cmd.body).text("rollout")
        rollout = rs.get_rollout(conn, rid)
        if rollout is None:
            raise CommandError(f"no rollout {rid}; see `hub rollout list`")
        ro.check_transition(action, rollout["state"], rid)
        return rollout

    def _simple(self, action: str, kind: str) -> Callable[[Connection, VerifiedCommand],
                                                           Outcome]:
        def handler(conn: Connection, cmd: VerifiedCommand) -> Outcome:
            rollout = self._load(conn, cmd, action)
            payload: dict[str, Any] = {"rollout": rollout["rollout"]}
            if kind in (ev.ROLLOUT_PAUSED, ev.ROLLOUT_ABORTED):
                payload["reason"] = str(cmd.body.get("reason", ""))
            event = command_event(cmd, kind, ev.rollout_subject(rollout["rollout"]), payload)
            return Outcome([event], {"rollout": rollout["rollout"],
                                     "state": kind.split(".")[1]})

        return handler

    def rollback(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        rollout = self._load(conn, cmd, "rollback")
        reason = str(cmd.body.get("reason", "")) or "operator rollback"
        events, issued, result = rollback_events(
            conn, self.issuer, rollout, cmd.operator.keyid, reason, False)
        events[0] = NewEvent(events[0].kind, events[0].actor, events[0].subject,
                             {**events[0].payload, "command": cmd.envelope})

        async def deliver() -> None:
            await write_all(self.effects.put_assignment, issued.writes)

        return Outcome(events, {**result, "state": ro.ROLLED_BACK}, [deliver])


def _refuse_blind_psi_gate(release: dict[str, Any]) -> None:
    """A PSI gate on a release whose drift reference has no spread would be blind (the
    validation flagged it): say so instead of letting it pass silently."""
    reference = (release.get("validation") or {}).get("reference_histograms", [])
    blind = blind_outputs(reference if isinstance(reference, list) else [])
    if blind:
        raise CommandError(
            f"the PSI gate (--max-psi) would be blind for {release['name']}/"
            f"{release['version']}: {drift_blind_warning(blind)}; or create the rollout "
            "without --max-psi")

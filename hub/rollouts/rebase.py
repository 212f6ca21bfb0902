"""`model.rebase`: re-base a released model's drift reference on the output histograms
its fleet reported (the rules and the fold are hub/governance/rebase.py).

Here because it reads all three of what it needs: the release (governance), a rollout's
devices (rollouts) and the telemetry aggregates (the `TelemetryIngest` the rollout reads
hold too). The command is an ordinary write: the histograms are summed in memory under
the write lock, the event carries them, and the fold applies them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Outcome, Verbs, command_event
from hub.governance import rules as lc
from hub.governance.models import model_ref
from hub.governance.rebase import (
    DEFAULT_MIN_INFERENCES,
    Observed,
    RebaseRefused,
    rebase_payload,
)
from hub.governance.state import require_release
from hub.rollouts import state as rs
from hub.telemetry.ingest import TelemetryIngest


class RebaseCommands:
    def __init__(self, telemetry: TelemetryIngest) -> None:
        self.telemetry = telemetry

    def handlers(self) -> Verbs:
        return Verbs(writes={"model.rebase": self.rebase})

    def rebase(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name, version = model_ref(cmd.body)
        body = Body(cmd.body)
        min_inferences = body.whole_number("min_inferences", DEFAULT_MIN_INFERENCES, 1, None)
        since_ns = body.whole_number("since_ns", 0, 0, None)
        rid = cmd.body.get("rollout")
        if rid is not None and (not isinstance(rid, str) or not rid):
            raise CommandError("invalid 'rollout': expected a rollout id")
        if rid is not None and since_ns:
            raise CommandError("give --rollout or --since, not both")
        row = require_release(conn, name, version)
        if row["state"] != lc.RELEASED:
            raise CommandError(f"cannot re-base {name}/{version}: it is {row['state']}; only a "
                               "released version has fleet traffic to re-base on")
        keys: set[tuple[str, str, int]] | None = None
        source: dict[str, Any] = {}
        if rid is not None:
            rollout = rs.get_rollout(conn, rid)
            if rollout is None:
                raise CommandError(f"no rollout {rid}; see `hub rollout list`")
            if (rollout["model"], rollout["version"]) != (name, version):
                raise CommandError(f"rollout {rid} is of {rollout['model']}/"
                                   f"{rollout['version']}, not {name}/{version}")
            keys = {(m.device, row["digest"], m.counter)
                    for m in rs.member_rows(conn, rid) if m.counter}
            source["rollout"] = rid
        elif since_ns:
            source["since"] = since_ns
        else:
            source["fleet"] = True
        outputs, inferences, devices, assignments, first, last = \
            self.telemetry.release_histograms(name, version, row["digest"], keys, since_ns)
        observed = Observed(outputs, inferences, devices, assignments, first, last)
        try:
            payload = rebase_payload(name, version, row["validation"], observed, source,
                                     min_inferences)
        except RebaseRefused as exc:
            raise CommandError(str(exc)) from None
        event = command_event(cmd, ev.MODEL_REFERENCE_REBASED, ev.model_subject(name, version),
                              payload)
        return Outcome([event], {
            "name": name, "version": version, "source": payload["source"],
            "reference_digest": payload["reference_digest"],
            "previous_digest": payload["previous_digest"],
            "outputs": len(payload["histograms"])})

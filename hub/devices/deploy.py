"""`deploy`: one release straight to named devices (or all), outside any rollout."""

from __future__ import annotations

from sqlalchemy import Connection

from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Effects, Outcome, Verbs, command_event
from hub.commands.writer import next_seq
from hub.devices import state as device_state
from hub.devices.assignments import AssignmentIssuer, write_all
from hub.devices.state import REVOKED
from hub.governance.state import require_release, require_transition
from hub.rollouts.state import refuse_busy


class DeployCommands:
    def __init__(self, issuer: AssignmentIssuer, effects: Effects) -> None:
        self.issuer = issuer
        self.effects = effects

    def handlers(self) -> Verbs:
        return Verbs(writes={"deploy": self.deploy})

    def deploy(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        body = Body(cmd.body)
        name, version = body.text("model"), body.text("version")
        wanted = cmd.body.get("devices", [])
        if not isinstance(wanted, list) or not all(isinstance(d, str) for d in wanted):
            raise CommandError("devices must be a list of device ids")
        all_devices = cmd.body.get("all") is True
        if not wanted and not all_devices:
            raise CommandError("name at least one --device, or use --all")
        release = require_release(conn, name, version)
        require_transition("deploy", release)
        states = {d["device"]: d["state"] for d in device_state.list_devices(conn)}
        # Revoked devices are never deployed to: named, the deploy is refused; --all
        # skips them (and says how many).
        revoked = sorted(d for d, state in states.items() if state == REVOKED)
        if all_devices:
            targets = sorted(d for d in states if states[d] != REVOKED)
        else:
            targets = list(dict.fromkeys(wanted))
            unknown = [d for d in targets if d not in states]
            if unknown:
                raise CommandError(
                    f"unknown device(s): {', '.join(unknown)}; enroll them first")
            named = [d for d in targets if states[d] == REVOKED]
            if named:
                raise CommandError(
                    f"device(s) {', '.join(named)} are revoked and never get a deployment; "
                    "leave them out (`hub devices --state revoked` lists them)")
            revoked = []
        if not targets:
            raise CommandError("no devices are enrolled" + (
                f" that are not revoked ({len(revoked)} revoked)" if revoked else ""))
        # A direct deploy must not pull a device out from under a running rollout.
        refuse_busy(conn, targets, "let it finish, or `hub rollout abort {owner}` first")
        deployment = f"dep-{next_seq(conn)}"
        issued = self.issuer.issue(conn, cmd.operator.keyid, deployment, targets, release,
                                   previous=False, in_rollout=False)
        created = command_event(cmd, ev.DEPLOYMENT_CREATED, ev.deployment_subject(deployment),
                                {"deployment": deployment, "model": name, "version": version,
                                 "devices": targets})

        async def deliver() -> None:
            await write_all(self.effects.put_assignment, issued.writes)

        return Outcome([created, *issued.events], {"deployment": deployment,
                                                   "devices": targets,
                                                   "skipped_revoked": revoked}, [deliver])

"""Operators: `operator.add` / `operator.revoke`, and the first admin from `hub init`."""

from __future__ import annotations

import logging

from sqlalchemy import Connection

from hub import events as ev
from hub.commands.envelope import ROLES, VerifiedCommand
from hub.commands.outcome import Body, CommandError, Effects, Outcome, Verbs, command_event
from hub.commands.writer import LedgerWriter
from hub.governance import state as governance
from hub.home.config import BOOTSTRAP_ADMIN, BOOTSTRAP_ROLES, HubConfig
from hub.home.nats_users import identity_holder
from ledger.signing import PublicKey
from ledger.storage.store import NewEvent

log = logging.getLogger("hub")


class OperatorCommands:
    def __init__(self, effects: Effects) -> None:
        self.effects = effects

    def handlers(self) -> Verbs:
        return Verbs(writes={"operator.add": self.add, "operator.revoke": self.revoke})

    def add(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name = Body(cmd.body).text("name")
        public = cmd.body.get("public")
        roles = cmd.body.get("roles")
        if not isinstance(public, bytes) or len(public) != 32:
            raise CommandError("'public' must be a 32-byte Ed25519 public key")
        if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
            raise CommandError(f"roles must be a non-empty list of: {', '.join(ROLES)}")
        keyid = PublicKey(public).keyid
        for op in governance.list_operators(conn):
            if op["keyid"] == keyid:
                raise CommandError(f"key {keyid} already belongs to operator {op['name']}")
            if op["name"] == name and not op["revoked"]:
                raise CommandError(f"operator {name} already exists; revoke the old key first")
        holder = identity_holder(conn, public)
        if holder is not None and holder.startswith("device "):
            raise CommandError(f"key {keyid} is already the key of {holder}: an operator "
                               "needs a key of its own")
        payload = {"name": name, "keyid": keyid, "public": public, "roles": sorted(set(roles))}
        # Before the reply: the new operator can connect as soon as the command returns.
        return Outcome([command_event(cmd, ev.OPERATOR_ADDED, ev.operator_subject(name),
                                      payload)],
                       {"name": name, "keyid": keyid, "roles": payload["roles"]},
                       [self._nats_users])

    def revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name = Body(cmd.body).text("name")
        reason = str(cmd.body.get("reason", ""))
        active = [o for o in governance.list_operators(conn)
                  if o["name"] == name and not o["revoked"]]
        if not active:
            raise CommandError(f"no active operator named {name}")
        if active[0]["keyid"] == cmd.operator.keyid:
            raise CommandError("you cannot revoke your own key; ask another admin")
        payload = {"name": name, "keyid": active[0]["keyid"], "reason": reason}
        # Before the reply: the revoked key is off NATS when it comes.
        return Outcome(
            [command_event(cmd, ev.OPERATOR_REVOKED, ev.operator_subject(name), payload)],
            payload, [self._nats_users],
        )

    async def _nats_users(self) -> None:
        """After the commit: the NATS users file follows the ledger's operators."""
        await self.effects.sync_nats_users(wait=True)


async def bootstrap_admin(config: HubConfig, writer: LedgerWriter) -> bool:
    """The first operator comes from `hub init`'s config, recorded once in the ledger;
    True if it was recorded now."""
    async with writer.lock:
        if writer.read(governance.list_operators):
            return False
        if not config.admin_public:
            log.warning("no operators in the ledger and no admin_public in config.toml")
            return False
        public = bytes.fromhex(config.admin_public)
        payload = {"name": BOOTSTRAP_ADMIN, "keyid": PublicKey(public).keyid,
                   "public": public, "roles": sorted(BOOTSTRAP_ROLES), "bootstrap": True}
        await writer.append([NewEvent(ev.OPERATOR_ADDED, ev.HUB_ACTOR,
                                      ev.operator_subject(BOOTSTRAP_ADMIN), payload)])
        return True

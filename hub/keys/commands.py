"""Operator commands on the trust root: `keys` (show), `keys.rotate`, `keys.revoke`,
`keys.import_root`.

The first two writes make root N+1 (hub.keys.keyring.plan_next_root); `keys.import_root`
takes root N+1 signed with the offline root key (`hub keys root prepare|sign|import`,
hub/keys/offline.py) and checks it with the devices' chain rule. All three append it to the ledger
(`keys.rotated` / `keys.revoked`, the signed root in `root`), and only after the commit
store it in HOME and publish it in the KV bucket `roots` (`root.<N>` and `root.latest`),
where agents walk the chain. A new key file is written *before* the commit: the ledger
must never name a key nobody holds.

Revoking a release or director key invalidates what it signed, so the revocation also
re-signs, with the keys that remain, every live release manifest (`model.resigned`) and
every device's current assignment (`device.assigned` with the next counter and
`resigned: true`); devices then install the re-signed assignment (same bytes: no
download) and keep working. Keys of the root and log roles sign nothing devices store.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import blake3
from sqlalchemy import Connection

from edge_agent import protocol as proto
from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import (
    AfterCommit,
    Body,
    CommandError,
    Effects,
    Outcome,
    Verbs,
)
from hub.devices.assignments import AssignmentIssuer, write_all
from hub.governance import rules as lc
from hub.governance import state as governance
from hub.home.config import HubConfig
from hub.keys.keyring import WITNESS_ROLE, KeyChange, KeyChangeRefused, Keyring, plan_next_root
from hub.keys.offline import OFFLINE_HINT, read_signed_root
from hub.log.checkpointer import saved_log_vkeys, write_log_vkey
from ledger.signing import SigningKey
from ledger.storage import query
from ledger.storage.store import NewEvent

log = logging.getLogger("hub.keys")

LIVE_STATES = (lc.RELEASED, lc.DEPRECATED)


class RootChanges:
    """How a new trust root is recorded: its ledger event (`keys.rotated` /
    `keys.revoked`, the signed root in `root`) and, after the commit, the root stored in
    HOME and published in KV. Key commands and witness commands share it."""

    def __init__(self, config: HubConfig, keyring: Keyring, effects: Effects) -> None:
        self.config = config
        self.keyring = keyring
        self.effects = effects
        # Called once a new root is published: the timestamp must name it before the
        # assignments re-signed by a revocation reach the devices (hub/keys/timestamps.py).
        self.after_publish: Callable[[], Awaitable[object]] | None = None

    def event(self, cmd: VerifiedCommand, kind: str, change: KeyChange,
              extra: dict[str, Any]) -> NewEvent:
        payload = {"role": change.role, "keyid": change.keyid, "threshold": change.threshold,
                   "version": change.version, "root": change.root.encode(), **extra,
                   "command": cmd.envelope}
        return NewEvent(kind, cmd.operator.keyid, ev.root_subject(change.version), payload)

    def require_root_key(self, args: str) -> None:
        """Refuse an online root change when the hub holds none of the root keys: say
        which commands make the change with the offline key instead (`args`: the
        change, as `hub keys root prepare` takes it)."""
        # HOME/keys is read again: `hub keys root export-offline` may have moved the root
        # key out, and `hub keys root prepare` may have added a role key, since the start.
        self.keyring.reload()
        root = self.keyring.root
        if not root.role_signers("root", self.keyring.held):
            raise KeyChangeRefused(OFFLINE_HINT.format(version=root.version + 1, args=args))

    def commit(self, change: KeyChange, revoked: str | None = None) -> AfterCommit:
        async def effect() -> None:
            data = change.root.encode()
            self.keyring.store_root(data)
            if revoked is not None:
                self.keyring.retire_key_file(revoked)
                self.keyring.reload()
            if change.role == "log":
                # What witnesses and auditors are told to use: the newest log key.
                write_log_vkey(self.config)
            await self.effects.publish_root(data)
            if self.after_publish is not None:
                await self.after_publish()
            log.info("trust root version %d published (%s %s)", change.version, change.role,
                     change.keyid)

        return effect


# How a witness root signed offline is recorded (hub.keys.witnesses.WitnessCommands
# .imported): the very event and effects of `hub witness add|remove`.
WitnessImport = Callable[[VerifiedCommand, KeyChange, dict[str, Any]], Outcome]


class KeyCommands:
    def __init__(self, roots: RootChanges, issuer: AssignmentIssuer,
                 witness_import: WitnessImport) -> None:
        self.roots = roots
        self.witness_import = witness_import
        self.keyring = roots.keyring
        self.effects = roots.effects
        self.issuer = issuer

    def handlers(self) -> Verbs:
        return Verbs(writes={"keys.rotate": self.rotate, "keys.revoke": self.revoke,
                             "keys.import_root": self.import_root},
                     reads={"keys": self.show})

    # ------------------------------------------------------------ reads

    def show(self, cmd: VerifiedCommand) -> Any:
        root = self.keyring.root
        held = {k.keyid for k in self.keyring.held}
        roles = [{"role": role, "keyids": list(spec.keyids), "threshold": spec.threshold,
                  "held": [k for k in spec.keyids if k in held],
                  "names": {k: root.names[k] for k in spec.keyids if k in root.names}}
                 for role, spec in root.roles.items()]
        listed = set(root.roles["log"].keyids) if "log" in root.roles else set()
        log_keys = [{"keyid": k, "vkey": v, "revoked": k not in listed}
                    for k, v in saved_log_vkeys(self.roots.config).items()]
        return {"version": root.version, "expires": root.expires, "roles": roles,
                "log_keys": log_keys, "root": root.envelope.encode()}

    # ------------------------------------------------------------ writes

    def rotate(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        body = Body(cmd.body)
        role, threshold = body.text("role"), body.positive("threshold")
        self.roots.require_root_key(f"--rotate {role}"
                            + (f" --threshold {threshold}" if threshold else ""))
        new_key = SigningKey.generate()
        change = plan_next_root(self.keyring.root, self.keyring.held, role, add=new_key,
                                threshold=threshold)
        path = self.keyring.save_new_key(role, new_key)
        event = self.roots.event(cmd, ev.KEYS_ROTATED, change, {"key_file": path.name})
        return Outcome([event], _result(change, path.name), [self.roots.commit(change)])

    def revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        keyid = Body(cmd.body).text("keyid")
        role = self._role_of(keyid)
        self.roots.require_root_key(f"--revoke {keyid}")
        held = [k for k in self.keyring.held if k.keyid != keyid]
        revoked = [k for k in self.keyring.held if k.keyid == keyid]
        # The revoked key still counts for root N (it is listed there).
        change = plan_next_root(self.keyring.root, [*held, *revoked], role, remove=keyid)
        return self._revocation(conn, cmd, change, {})

    def import_root(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        """Root N+1 signed with the offline root key(s) (`hub keys root import`): checked
        with the devices' chain rule, then recorded, stored and published exactly as
        `rotate` / `revoke` record theirs (a revocation re-signs what the key signed)."""
        data = cmd.body.get("root")
        if not isinstance(data, bytes):
            raise CommandError("keys.import_root needs 'root' (the signed root, bytes)")
        self.keyring.reload()  # the key `hub keys root prepare` wrote for a rotated role
        planned, change = read_signed_root(self.keyring.root, data, self.keyring.held)
        extra = {"offline": True}
        if change.role == WITNESS_ROLE:
            return self.witness_import(cmd, change, extra)
        if not planned.added:
            return self._revocation(conn, cmd, change, extra)
        held = [k for k in self.keyring.held if k.keyid == change.keyid]
        key_file = self.keyring.new_key_path(change.role, held[0]).name if held else ""
        event = self.roots.event(cmd, ev.KEYS_ROTATED, change, {"key_file": key_file, **extra})
        return Outcome([event], {**_result(change, key_file), **extra},
                       [self.roots.commit(change)])

    def _role_of(self, keyid: str) -> str:
        roles = [r for r, spec in self.keyring.root.roles.items() if keyid in spec.keyids]
        if not roles:
            raise CommandError(f"key {keyid} is in no role of trust root version "
                               f"{self.keyring.root.version}; see `hub keys show`")
        if len(roles) > 1:
            raise CommandError(f"key {keyid} is in several roles ({', '.join(roles)})")
        role = roles[0]
        if role == "witness":
            name = self.keyring.root.names.get(keyid, "NAME")
            raise CommandError(f"{keyid} is a witness key: remove it with "
                               f"`hub witness remove {name}`")
        return role

    def _revocation(self, conn: Connection, cmd: VerifiedCommand, change: KeyChange,
                    extra: dict[str, Any]) -> Outcome:
        """The events and effects of root N+1 without key `change.keyid`: for a release
        or director key, every live manifest and current assignment re-signed with the
        keys that remain."""
        keyid, role, new_root = change.keyid, change.role, change.root
        held = [k for k in self.keyring.held if k.keyid != keyid]
        remaining = [k for k in held
                     if k.keyid in _role_keyids(new_root, role)]
        events: list[NewEvent] = []
        effects: list[AfterCommit] = [self.roots.commit(change, keyid)]
        manifests = assignments = 0
        if role in ("release", "director"):
            release_keys = remaining if role == "release" else self.keyring.signers("release")
            director_keys = remaining if role == "director" else self.keyring.signers("director")
            resigned: dict[tuple[str, str], str] = {}  # (name, version) -> manifest hash
            if role == "release":
                for name, version, envelope in live_manifests(conn):
                    new_env = _resign(envelope, proto.DOMAIN_MANIFEST, release_keys)
                    new_hash = blake3.blake3(new_env).hexdigest()
                    resigned[(name, version)] = new_hash
                    digest = proto.SignedEnvelope.decode(new_env).document("manifest")["digest"]
                    events.append(NewEvent(ev.MODEL_RESIGNED, cmd.operator.keyid,
                                           ev.model_subject(name, version), {
                        "name": name, "version": version, "digest": digest,
                        "manifest_hash": new_hash, "manifest": new_env,
                        "reason": f"release key {keyid} revoked"}))
                    effects.append(self._put_manifest(proto.manifest_key(name, version),
                                                      new_env))
                manifests = len(resigned)
            issued = self.issuer.reissue(conn, cmd.operator.keyid, director_keys, resigned,
                                         f"re-signed: key {keyid} revoked")
            events += issued.events
            assignments = len(issued.writes)

            async def deliver() -> None:
                await write_all(self.effects.put_assignment, issued.writes)

            effects.append(deliver)
        first = self.roots.event(cmd, ev.KEYS_REVOKED, change, {
            "resigned_manifests": manifests, "resigned_assignments": assignments, **extra})
        result = {**_result(change, ""), "resigned_manifests": manifests,
                  "resigned_assignments": assignments, **extra}
        return Outcome([first, *events], result, effects)

    def _put_manifest(self, key: str, envelope: bytes) -> AfterCommit:
        return lambda: self.effects.put_manifest(key, envelope)


def _role_keyids(root: proto.SignedEnvelope, role: str) -> set[str]:
    doc = root.document("trust root")
    return set(doc["roles"][role]["keyids"])


def _result(change: KeyChange, key_file: str) -> dict[str, Any]:
    return {"role": change.role, "keyid": change.keyid, "version": change.version,
            "threshold": change.threshold, "key_file": key_file}


def _resign(envelope: bytes, domain: str, keys: list[SigningKey]) -> bytes:
    """The same signed document with fresh signatures from `keys` only."""
    signed = proto.SignedEnvelope.decode(envelope).signed
    return proto.SignedEnvelope(
        signed, tuple(proto.Signature(k.keyid, k.sign(domain, signed)) for k in keys)
    ).encode()


def live_manifests(conn: Connection) -> list[tuple[str, str, bytes]]:
    """(name, version, newest signed manifest) of every release devices may still fetch."""
    newest: dict[tuple[str, str], bytes] = {}
    released = query.EntryFilter(kinds=(ev.MODEL_RELEASED, ev.MODEL_RESIGNED))
    for entry in query.iter_entries(conn, released):
        p = entry.payload
        newest[(p["name"], p["version"])] = p["manifest"]
    out = []
    for (name, version), manifest in sorted(newest.items()):
        row = governance.get_release(conn, name, version)
        if row is not None and row["state"] in LIVE_STATES:
            out.append((name, version, manifest))
    return out

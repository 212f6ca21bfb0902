"""Operator commands on the trust root: `keys` (show), `keys.rotate`, `keys.revoke`.

Both writes make root N+1 (hub.keyring.plan_next_root), append it to the ledger
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
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import blake3
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from sqlalchemy import Connection, select

from edge_agent import protocol as proto
from edge_agent.protocol.names import ROOT_LATEST_KEY, ROOTS_BUCKET, root_key
from hub import events as ev
from hub import fold as proj
from hub.commands.envelope import VerifiedCommand
from hub.commands.handlers import DAY_NS, CommandError, Outcome
from hub.governance import rules as lc
from hub.home.config import HubConfig
from hub.keys.keyring import KeyChange, KeyChangeRefused, Keyring, plan_next_root
from hub.log.checkpointer import write_log_vkey
from ledger.entry import Entry
from ledger.signing import SigningKey
from ledger.storage.schema import ENTRIES
from ledger.storage.store import LedgerStore, NewEvent

log = logging.getLogger("hub.keys")

LIVE_STATES = (lc.RELEASED, lc.DEPRECATED)


class KeyEffects(Protocol):
    async def put_manifest(self, key: str, envelope: bytes) -> None: ...
    async def put_assignment(self, device: str, envelope: bytes) -> None: ...
    async def publish_root(self, data: bytes) -> None: ...


class KeyCommands:
    def __init__(self, config: HubConfig, keyring: Keyring, effects: KeyEffects) -> None:
        self.config = config
        self.keyring = keyring
        self.effects = effects

    # ------------------------------------------------------------ reads

    def show(self, cmd: VerifiedCommand) -> Any:
        root = self.keyring.root
        held = {k.keyid for k in self.keyring.held}
        roles = [{"role": role, "keyids": list(spec.keyids), "threshold": spec.threshold,
                  "held": [k for k in spec.keyids if k in held],
                  "names": {k: root.names[k] for k in spec.keyids if k in root.names}}
                 for role, spec in root.roles.items()]
        return {"version": root.version, "expires": root.expires, "roles": roles,
                "root": root.envelope.encode()}

    # ------------------------------------------------------------ writes

    def rotate(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        role = _text(cmd.body, "role")
        threshold = _threshold(cmd.body)
        new_key = SigningKey.generate()
        try:
            change = plan_next_root(self.keyring.root, self.keyring.held, role, add=new_key,
                                    threshold=threshold)
        except KeyChangeRefused as exc:
            raise CommandError(str(exc)) from exc
        path = self.keyring.save_new_key(role, new_key)
        event = self._key_event(cmd, ev.KEYS_ROTATED, change, {"key_file": path.name})
        return Outcome([event], _result(change, path.name), [self._commit_root(change)])

    def revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        keyid = _text(cmd.body, "keyid")
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
        held = [k for k in self.keyring.held if k.keyid != keyid]
        revoked = [k for k in self.keyring.held if k.keyid == keyid]
        try:
            # The revoked key still counts for root N (it is listed there).
            change = plan_next_root(self.keyring.root, [*held, *revoked], role, remove=keyid)
        except KeyChangeRefused as exc:
            raise CommandError(str(exc)) from exc
        new_root = change.root
        remaining = [k for k in held
                     if k.keyid in _role_keyids(new_root, role)]
        events: list[NewEvent] = []
        effects: list[Callable[[], Awaitable[None]]] = [self._commit_root(change, keyid)]
        manifests = assignments = 0
        if role in ("release", "director"):
            release_keys = remaining if role == "release" else self.keyring.signers("release")
            director_keys = remaining if role == "director" else self.keyring.signers("director")
            resigned: dict[tuple[str, str], tuple[str, bytes]] = {}
            if role == "release":
                for name, version, envelope in _live_manifests(conn):
                    new_env = _resign(envelope, proto.DOMAIN_MANIFEST, release_keys)
                    new_hash = blake3.blake3(new_env).hexdigest()
                    resigned[(name, version)] = (new_hash, new_env)
                    digest = proto.SignedEnvelope.decode(new_env).document("manifest")["digest"]
                    events.append(NewEvent(ev.MODEL_RESIGNED, cmd.operator.keyid,
                                           ev.model_subject(name, version), {
                        "name": name, "version": version, "digest": digest,
                        "manifest_hash": new_hash, "manifest": new_env,
                        "reason": f"release key {keyid} revoked"}))
                    effects.append(_bind(self.effects.put_manifest,
                                         proto.manifest_key(name, version), new_env))
                manifests = len(resigned)
            for payload in self._reissued_assignments(conn, resigned, director_keys, keyid):
                events.append(NewEvent(ev.DEVICE_ASSIGNED, cmd.operator.keyid,
                                       ev.device_subject(payload["device"]), payload))
                effects.append(_bind(self.effects.put_assignment, payload["device"],
                                     payload["assignment"]))
                assignments += 1
        first = self._key_event(cmd, ev.KEYS_REVOKED, change, {
            "resigned_manifests": manifests, "resigned_assignments": assignments})
        result = {**_result(change, ""), "resigned_manifests": manifests,
                  "resigned_assignments": assignments}
        return Outcome([first, *events], result, effects)

    # ------------------------------------------------------------ helpers

    def _key_event(self, cmd: VerifiedCommand, kind: str, change: KeyChange,
                   extra: dict[str, Any]) -> NewEvent:
        payload = {"role": change.role, "keyid": change.keyid, "threshold": change.threshold,
                   "version": change.version, "root": change.root.encode(), **extra,
                   "command": cmd.envelope}
        return NewEvent(kind, cmd.operator.keyid, ev.root_subject(change.version), payload)

    def _commit_root(self, change: KeyChange,
                     revoked: str | None = None) -> Callable[[], Awaitable[None]]:
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
            log.info("trust root version %d published (%s %s)", change.version, change.role,
                     change.keyid)

        return effect

    def _reissued_assignments(
        self, conn: Connection, manifests: dict[tuple[str, str], tuple[str, bytes]],
        director_keys: list[SigningKey], revoked: str,
    ) -> Iterable[dict[str, Any]]:
        """Each device's current assignment again, next counter, signed by `director_keys`."""
        now = time.time_ns()
        devices = {d["device"]: d for d in proj.list_devices(conn)}
        for device, last in sorted(_current_assignments(conn).items()):
            row = devices.get(device)
            if (row is None or row["counter"] != last.get("counter")
                    or not isinstance(last.get("assignment"), bytes)):
                continue
            release = proj.get_release(conn, last["model"], last["version"])
            if release is None or not release["manifest_hash"]:
                continue
            manifest_hash = manifests.get((last["model"], last["version"]),
                                          (release["manifest_hash"], b""))[0]
            old = proto.Assignment.from_map(
                proto.SignedEnvelope.decode(last["assignment"]).document("assignment"))
            assignment = proto.Assignment(
                device=device, model=old.model, version=old.version, digest=old.digest,
                manifest_hash=manifest_hash, counter=row["counter"] + 1, rollout=old.rollout,
                issued_at=now, expires=now + self.config.assignment_ttl_days * DAY_NS,
            )
            envelope = proto.SignedEnvelope.sign(
                assignment.to_map(), proto.DOMAIN_ASSIGNMENT, director_keys).encode()
            yield {**{k: v for k, v in last.items() if k != "command"},
                   "counter": assignment.counter, "manifest_hash": manifest_hash,
                   "assignment": envelope, "resigned": True,
                   "reason": f"re-signed: key {revoked} revoked"}


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"missing or invalid {key!r}: expected text")
    return value


def _threshold(body: dict[str, Any]) -> int | None:
    value = body.get("threshold")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CommandError("threshold must be a positive integer")
    return value


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


def _entries(conn: Connection, kinds: tuple[str, ...]) -> Iterable[Entry]:
    query = (select(ENTRIES.c.body, ENTRIES.c.prev, ENTRIES.c.hash)
             .where(ENTRIES.c.kind.in_(kinds)).order_by(ENTRIES.c.seq))
    for body, prev, hash_ in conn.execute(query):
        yield Entry.from_body(body, prev, hash_)


def _live_manifests(conn: Connection) -> list[tuple[str, str, bytes]]:
    """(name, version, newest signed manifest) of every release devices may still fetch."""
    newest: dict[tuple[str, str], bytes] = {}
    for entry in _entries(conn, (ev.MODEL_RELEASED, ev.MODEL_RESIGNED)):
        p = entry.payload
        newest[(p["name"], p["version"])] = p["manifest"]
    out = []
    for (name, version), manifest in sorted(newest.items()):
        row = proj.get_release(conn, name, version)
        if row is not None and row["state"] in LIVE_STATES:
            out.append((name, version, manifest))
    return out


def _current_assignments(conn: Connection) -> dict[str, dict[str, Any]]:
    """The payload of each device's newest `device.assigned` event."""
    out: dict[str, dict[str, Any]] = {}
    for entry in _entries(conn, (ev.DEVICE_ASSIGNED,)):
        out[entry.payload["device"]] = dict(entry.payload)
    return out


def _bind(fn: Callable[[str, bytes], Awaitable[None]], key: str,
          value: bytes) -> Callable[[], Awaitable[None]]:
    return lambda: fn(key, value)


# ---------------------------------------------------------------- publishing roots


def roots_from_ledger(store: LedgerStore) -> list[bytes]:
    """Every root the ledger records (keys.rotated / keys.revoked), oldest first."""
    with store.engine.connect() as conn:
        return [e.payload["root"] for e in _entries(conn, (ev.KEYS_ROTATED, ev.KEYS_REVOKED))]


async def publish_roots(js: JetStreamContext, keyring: Keyring, store: LedgerStore) -> None:
    """Bring HOME and the KV bucket `roots` up to date with the ledger, at hub start.

    A root the ledger has but HOME lacks (the hub stopped between the commit and
    writing the file) is written first.
    """
    for data in roots_from_ledger(store):
        try:
            version = proto.SignedEnvelope.decode(data).document("root")["version"]
        except (proto.ProtocolError, KeyError):
            continue
        if version not in keyring.roots():
            keyring.store_root(data)
    try:
        kv = await js.key_value(ROOTS_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        kv = await js.create_key_value(KeyValueConfig(bucket=ROOTS_BUCKET, history=1))
    roots = keyring.roots()
    for version in sorted(roots):
        await kv.put(root_key(version), roots[version])
    await kv.put(ROOT_LATEST_KEY, roots[max(roots)])


async def put_root(js: JetStreamContext, data: bytes) -> None:
    """Publish one new root: `root.<N>` first, then `root.latest`."""
    version = proto.SignedEnvelope.decode(data).document("root")["version"]
    kv = await js.key_value(ROOTS_BUCKET)
    await kv.put(root_key(int(version)), data)
    await kv.put(ROOT_LATEST_KEY, data)

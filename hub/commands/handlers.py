"""Operator command handlers: check against current state, turn into events.

Each handler gets a verified, signed command (hub.commands.VerifiedCommand) and returns
the events to append plus a result for the operator; `Hub` (service.py) appends them in
one transaction with their projection updates. Nothing here talks to NATS directly:
blob reads and KV writes go through the small `Effects` interface.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import blake3
from sqlalchemy import Connection

from edge_agent import protocol as proto
from edge_agent.runtime import ModelRuntimeError, preflight
from hub import events as ev
from hub import fold as proj
from hub.commands.envelope import ROLES, VerifiedCommand
from hub.devices.reports import REVOKED, write_bundle
from hub.errors import Refused
from hub.governance import rules as lc
from hub.home.config import HubConfig
from hub.keys.keyring import Keyring
from hub.rollouts import state as rollout_state
from ledger.signing import PublicKey, SigningKey
from ledger.storage.store import NewEvent

DAY_NS = 24 * 3600 * 10**9
MAX_DATASET_BYTES = 64 * 1024 * 1024
KV_WRITES_IN_FLIGHT = 64


Handler = Callable[[Connection, VerifiedCommand], "Outcome"]
# A command whose slow part (reading blobs, running a model) must not hold the hub's
# single write lock: checks against the current state return this coroutine function,
# which runs with no lock and no database connection and returns the `Handler` that
# re-checks the state and builds the events under the lock (hub/service.py, _dispatch).
SlowWork = Callable[[], Awaitable[Handler]]


class CommandError(Refused):
    """A command was refused; the message goes back to the operator as is."""


class Effects(Protocol):
    """What handlers need from the outside world (NATS in the hub, fakes in tests)."""

    async def read_blob(self, digest: str, size: int, dest: Path) -> str: ...
    async def put_manifest(self, key: str, envelope: bytes) -> None: ...
    async def sync_nats_users(self, wait: bool = True) -> bool: ...


@dataclass
class Outcome:
    events: list[NewEvent]
    result: Any
    after_commit: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"missing or invalid {key!r}: expected text")
    return value


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CommandError(f"missing or invalid {key!r}: expected a non-negative integer")
    return value


def _map(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key, {})
    if not isinstance(value, dict):
        raise CommandError(f"invalid {key!r}: expected a map")
    return value


def _model_ref(body: dict[str, Any]) -> tuple[str, str]:
    name, version = _text(body, "name"), _text(body, "version")
    try:
        proto.check_model_ref(name, version)
    except proto.ProtocolError as exc:
        raise CommandError(str(exc)) from exc
    return name, version


class Commands:
    def __init__(self, config: HubConfig, effects: Effects) -> None:
        self.config = config
        self.effects = effects
        # Signing keys come from the keyring: after `hub keys rotate` the new key signs.
        self.keyring = Keyring(config)

    @property
    def release_key(self) -> SigningKey:
        return self.keyring.signers("release")[-1]

    @property
    def director_key(self) -> SigningKey:
        return self.keyring.signers("director")[-1]

    # ------------------------------------------------------------ helpers

    def _release(self, conn: Connection, name: str, version: str) -> dict[str, Any]:
        row = proj.get_release(conn, name, version)
        if row is None:
            raise CommandError(f"model {name}/{version} is not registered; see `hub model list`")
        return row

    def _transition(self, action: str, row: dict[str, Any]) -> None:
        try:
            lc.check_transition(action, row["state"], row["name"], row["version"])
        except lc.TransitionRefused as exc:
            raise CommandError(str(exc)) from exc

    @staticmethod
    def _event(cmd: VerifiedCommand, kind: str, subject: str, payload: dict[str, Any],
               with_command: bool = True) -> NewEvent:
        if with_command:
            payload = {**payload, "command": cmd.envelope}
        return NewEvent(kind, cmd.operator.keyid, subject, payload)

    # ------------------------------------------------------------ operators

    def operator_add(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name = _text(cmd.body, "name")
        public = cmd.body.get("public")
        roles = cmd.body.get("roles")
        if not isinstance(public, bytes) or len(public) != 32:
            raise CommandError("'public' must be a 32-byte Ed25519 public key")
        if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
            raise CommandError(f"roles must be a non-empty list of: {', '.join(ROLES)}")
        keyid = PublicKey(public).keyid
        for op in proj.list_operators(conn):
            if op["keyid"] == keyid:
                raise CommandError(f"key {keyid} already belongs to operator {op['name']}")
            if op["name"] == name and not op["revoked"]:
                raise CommandError(f"operator {name} already exists; revoke the old key first")
        payload = {"name": name, "keyid": keyid, "public": public, "roles": sorted(set(roles))}
        # Before the reply: the new operator can connect as soon as the command returns.
        return Outcome([self._event(cmd, ev.OPERATOR_ADDED, ev.operator_subject(name), payload)],
                       {"name": name, "keyid": keyid, "roles": payload["roles"]},
                       [lambda: self._nats_users(wait=True)])

    def operator_revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name = _text(cmd.body, "name")
        reason = str(cmd.body.get("reason", ""))
        active = [o for o in proj.list_operators(conn) if o["name"] == name and not o["revoked"]]
        if not active:
            raise CommandError(f"no active operator named {name}")
        if active[0]["keyid"] == cmd.operator.keyid:
            raise CommandError("you cannot revoke your own key; ask another admin")
        payload = {"name": name, "keyid": active[0]["keyid"], "reason": reason}
        # Before the reply: the revoked key is off NATS when it comes.
        return Outcome(
            [self._event(cmd, ev.OPERATOR_REVOKED, ev.operator_subject(name), payload)],
            payload, [lambda: self._nats_users(wait=True)],
        )

    # ------------------------------------------------------------ models

    def model_register(self, conn: Connection, cmd: VerifiedCommand) -> SlowWork:
        name, version = _model_ref(cmd.body)
        digest, size = _text(cmd.body, "digest"), _int(cmd.body, "size")
        lineage, card = _map(cmd.body, "lineage"), _map(cmd.body, "card")
        self._check_unregistered(conn, name, version)

        async def inspect() -> Handler:
            with tempfile.TemporaryDirectory(prefix="hub-register-") as tmp:
                path = Path(tmp) / "model.tflite"
                await self._fetch_checked(digest, size, path, "model")
                try:
                    # In a child process: a corrupt model can crash the TFLite runtime.
                    signature = (await asyncio.to_thread(preflight, path)).signature
                except ModelRuntimeError as exc:
                    raise CommandError(f"not a loadable TFLite model: {exc}") from exc

            def commit(conn: Connection, cmd: VerifiedCommand) -> Outcome:
                self._check_unregistered(conn, name, version)  # a concurrent twin won
                payload = {
                    "name": name, "version": version, "digest": digest, "size": size,
                    "format": "tflite", "inputs": signature["inputs"],
                    "outputs": signature["outputs"], "lineage": lineage, "card": card,
                }
                event = self._event(cmd, ev.MODEL_REGISTERED, ev.model_subject(name, version),
                                    payload)
                return Outcome([event], {"name": name, "version": version, "digest": digest,
                                         "state": lc.REGISTERED})

            return commit

        return inspect

    @staticmethod
    def _check_unregistered(conn: Connection, name: str, version: str) -> None:
        if proj.get_release(conn, name, version) is not None:
            raise CommandError(
                f"model {name}/{version} is already registered; versions are immutable, "
                "register a new version"
            )

    async def _fetch_checked(self, digest: str, size: int, dest: Path, what: str) -> None:
        try:
            got = await self.effects.read_blob(digest, size, dest)
        except Exception as exc:
            raise CommandError(f"cannot read the uploaded {what}: {exc}") from exc
        if got != digest:
            raise CommandError(
                f"the stored {what} does not match digest {digest[:16]}…; upload it again"
            )

    def model_validate(self, conn: Connection, cmd: VerifiedCommand) -> SlowWork:
        from hub import validation  # numpy-heavy; only when validating

        name, version = _model_ref(cmd.body)
        row = self._release(conn, name, version)
        self._transition("validate", row)
        data_digest, data_size = _text(cmd.body, "data_digest"), _int(cmd.body, "data_size")
        if data_size > MAX_DATASET_BYTES:
            raise CommandError(f"validation data is over {MAX_DATASET_BYTES >> 20} MiB")
        try:
            policy = validation.load_policy(self.config.policy_path, name)
        except validation.ValidationError as exc:
            raise CommandError(f"policy {self.config.policy_path}: {exc}") from exc

        async def evaluate() -> Handler:
            with tempfile.TemporaryDirectory(prefix="hub-validate-") as tmp:
                model_path, data_path = Path(tmp) / "model.tflite", Path(tmp) / "data.npz"
                await self._fetch_checked(row["digest"], row["size"], model_path, "model")
                await self._fetch_checked(data_digest, data_size, data_path, "validation data")
                try:
                    dataset = validation.load_dataset(data_path)
                    report = await asyncio.to_thread(validation.validate, model_path, dataset,
                                                     policy)
                except validation.ValidationError as exc:
                    raise CommandError(f"validation could not run: {exc}") from exc

            def commit(conn: Connection, cmd: VerifiedCommand) -> Outcome:
                # The state may have moved while the model ran (another validation,
                # a rejection): judge the transition again against the ledger as it is now.
                self._transition("validate", self._release(conn, name, version))
                payload = {
                    "name": name, "version": version, **report.to_payload(),
                    "dataset_digest": data_digest, "policy": str(self.config.policy_path.name),
                    "approvals_required": int(policy.approvals_required),
                }
                event = self._event(cmd, ev.MODEL_VALIDATED, ev.model_subject(name, version),
                                    payload)
                return Outcome([event], {"name": name, "version": version,
                                         "passed": report.passed, "failures": report.failures,
                                         "metrics": payload["metrics"]})

            return commit

        return evaluate

    def model_approve(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name, version = _model_ref(cmd.body)
        row = self._release(conn, name, version)
        self._transition("approve", row)
        try:
            lc.check_approval(cmd.operator.keyid, row["registrant"], row["approvals"], name,
                              version)
        except lc.TransitionRefused as exc:
            raise CommandError(str(exc)) from exc
        count = len(row["approvals"]) + 1
        payload = {"name": name, "version": version, "approvals": count,
                   "required": row["approvals_required"]}
        state = lc.APPROVED if count >= row["approvals_required"] else lc.VALIDATED
        return Outcome(
            [self._event(cmd, ev.MODEL_APPROVED, ev.model_subject(name, version), payload)],
            {**payload, "state": state},
        )

    def _simple_transition(self, conn: Connection, cmd: VerifiedCommand, action: str,
                           kind: str, need_reason: bool) -> Outcome:
        name, version = _model_ref(cmd.body)
        row = self._release(conn, name, version)
        self._transition(action, row)
        reason = str(cmd.body.get("reason", ""))
        if need_reason and not reason:
            raise CommandError(f"{action} needs --reason: say why, for the record")
        payload = {"name": name, "version": version, "reason": reason}
        return Outcome([self._event(cmd, kind, ev.model_subject(name, version), payload)],
                       {**payload, "state": kind.split(".")[1]})

    def model_reject(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        return self._simple_transition(conn, cmd, "reject", ev.MODEL_REJECTED, True)

    def model_deprecate(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        return self._simple_transition(conn, cmd, "deprecate", ev.MODEL_DEPRECATED, False)

    def model_revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        return self._simple_transition(conn, cmd, "revoke", ev.MODEL_REVOKED, True)

    async def model_release(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name, version = _model_ref(cmd.body)
        row = self._release(conn, name, version)
        self._transition("release", row)
        now = time.time_ns()
        histograms = row["validation"].get("reference_histograms", [])
        manifest = proto.ReleaseManifest(
            name=name, version=version, digest=row["digest"], size=row["size"],
            format="tflite", inputs=row["inputs"], outputs=row["outputs"], created=now,
            expires=now + self.config.manifest_ttl_days * DAY_NS,
            drift_bins=[h.get("edges", []) for h in histograms if isinstance(h, dict)],
        )
        envelope = proto.SignedEnvelope.sign(
            manifest.to_map(), proto.DOMAIN_MANIFEST, self.keyring.signers("release")
        ).encode()
        manifest_hash = blake3.blake3(envelope).hexdigest()
        payload = {"name": name, "version": version, "digest": row["digest"],
                   "manifest_hash": manifest_hash, "manifest": envelope,
                   "expires": manifest.expires}
        # The manifest goes to the KV bucket only once the release is in the ledger.
        key = proto.manifest_key(name, version)
        return Outcome(
            [self._event(cmd, ev.MODEL_RELEASED, ev.model_subject(name, version), payload)],
            {"name": name, "version": version, "manifest_hash": manifest_hash,
             "state": lc.RELEASED},
            [lambda: self.effects.put_manifest(key, envelope)],
        )

    # ------------------------------------------------------------ devices

    def device_enroll(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        device = _text(cmd.body, "device")
        try:
            proto.check_device_id(device)
        except proto.ProtocolError as exc:
            raise CommandError(str(exc)) from exc
        if proj.get_device(conn, device) is not None:
            raise CommandError(f"device {device} is already enrolled")
        # The device's own key signs its status reports. Made here unless the device
        # brings its public key; the bundle is written before the ledger names the key.
        public = cmd.body.get("public")
        key = None
        if public is None:
            key = SigningKey.generate()
            public = key.public.raw
        elif not isinstance(public, bytes) or len(public) != 32:
            raise CommandError("'public' must be a 32-byte Ed25519 public key")
        bundle = write_bundle(self.config, device, key)
        event = self._event(cmd, ev.DEVICE_ENROLLED, ev.device_subject(device),
                            {"device": device, "public": public})
        result = {"device": device, "bundle": str(bundle), "keyid": PublicKey(public).keyid}
        # Answered once the server has the device's NATS user (the reload settled): the
        # device can connect right away, and nobody's next connect overlaps that reload.
        # Enrolments in flight together share one rewrite and reload (NatsUsersSync).
        return Outcome([event], result, [lambda: self._nats_users(wait=True)])

    def device_revoke(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        """Shut a device out: its NATS user goes; its reports are refused from now on."""
        device = _text(cmd.body, "device")
        row = proj.get_device(conn, device)
        if row is None:
            raise CommandError(f"no device {device} is enrolled")
        if row["state"] == REVOKED:
            raise CommandError(f"device {device} is already revoked")
        reason = cmd.body.get("reason", "")
        if not isinstance(reason, str):
            raise CommandError("'reason' must be text")
        event = self._event(cmd, ev.DEVICE_REVOKED, ev.device_subject(device),
                            {"device": device, "reason": reason})
        result: dict[str, Any] = {"device": device}

        async def shut_out() -> None:  # before the reply: the device is out when it comes
            result["reloaded"] = await self.effects.sync_nats_users(wait=True)
        return Outcome([event], result, [shut_out])

    async def _nats_users(self, wait: bool) -> None:
        """After the commit: the NATS users file follows the ledger's devices and operators."""
        await self.effects.sync_nats_users(wait=wait)

    def deploy(self, conn: Connection, cmd: VerifiedCommand, next_seq: int,
               put_assignment: Callable[[str, bytes], Awaitable[None]]) -> Outcome:
        body = cmd.body
        name, version = _text(body, "model"), _text(body, "version")
        wanted = body.get("devices", [])
        if not isinstance(wanted, list) or not all(isinstance(d, str) for d in wanted):
            raise CommandError("devices must be a list of device ids")
        all_devices = body.get("all") is True
        if not wanted and not all_devices:
            raise CommandError("name at least one --device, or use --all")
        release = proj.get_release(conn, name, version)
        if release is None:
            raise CommandError(f"model {name}/{version} is not registered; see `hub model list`")
        self._transition("deploy", release)
        known = {d["device"]: d for d in proj.list_devices(conn) if d["state"] != REVOKED}
        targets = sorted(known) if all_devices else list(dict.fromkeys(wanted))
        unknown = [d for d in targets if d not in known]
        if unknown:
            raise CommandError(f"unknown device(s): {', '.join(unknown)}; enroll them first")
        if not targets:
            raise CommandError("no devices are enrolled")
        # A direct deploy must not pull a device out from under a running rollout.
        busy = rollout_state.active_rollout_of(conn)
        clash = [d for d in targets if d in busy]
        if clash:
            owner = busy[clash[0]]
            raise CommandError(
                f"{len(clash)} device(s) are in active rollout {owner} "
                f"({', '.join(clash[:5])}{'…' if len(clash) > 5 else ''}); let it finish, "
                f"or `hub rollout abort {owner}` first"
            )
        deployment = f"dep-{next_seq}"
        now = time.time_ns()
        events = [self._event(cmd, ev.DEPLOYMENT_CREATED, ev.deployment_subject(deployment),
                              {"deployment": deployment, "model": name, "version": version,
                               "devices": targets})]
        writes: list[Callable[[], Awaitable[None]]] = []
        for device in targets:
            counter = int(known[device]["counter"]) + 1
            assignment = proto.Assignment(
                device=device, model=name, version=version, digest=release["digest"],
                manifest_hash=release["manifest_hash"], counter=counter, rollout=deployment,
                issued_at=now, expires=now + self.config.assignment_ttl_days * DAY_NS,
            )
            envelope = proto.SignedEnvelope.sign(
                assignment.to_map(), proto.DOMAIN_ASSIGNMENT, self.keyring.signers("director")
            ).encode()
            events.append(self._event(cmd, ev.DEVICE_ASSIGNED, ev.device_subject(device), {
                "device": device, "deployment": deployment, "model": name, "version": version,
                "digest": release["digest"], "counter": counter,
                "manifest_hash": release["manifest_hash"], "assignment": envelope,
            }, with_command=False))
            writes.append(_bind(put_assignment, device, envelope))
        return Outcome(events, {"deployment": deployment, "devices": targets},
                       [lambda: _all_written(writes)])


async def _all_written(writes: list[Callable[[], Awaitable[None]]]) -> None:
    """A deployment's KV writes, KV_WRITES_IN_FLIGHT at a time (one key per device: they
    are independent, and one after the other a 1,000-device deploy waited a NATS round
    trip per device). Every write is tried; the first failure is raised after them (the
    hub re-puts what the ledger says at its next start: hub/assignment_sync.py)."""
    slots = asyncio.Semaphore(KV_WRITES_IN_FLIGHT)

    async def one(write: Callable[[], Awaitable[None]]) -> None:
        async with slots:
            await write()

    for outcome in await asyncio.gather(*(one(w) for w in writes), return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


def _bind(fn: Callable[[str, bytes], Awaitable[None]], key: str,
          value: bytes) -> Callable[[], Awaitable[None]]:
    return lambda: fn(key, value)


def new_operator_key(path: Path) -> SigningKey:
    """Create an operator key file (0600) unless one exists; return the key."""
    if path.exists():
        return SigningKey.load(path)
    key = SigningKey.generate()
    key.save(path)
    os.chmod(path, 0o600)
    return key

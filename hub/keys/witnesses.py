"""`witness.add` / `witness.remove`: a witness's cosignature key into or out of the trust
root (model transparency).

A witness key is a public key only (the witness holds its seed; `ledger witness-key`
prints its vkey), so `hub keys rotate` (which makes a key the hub holds) does not fit.
`plan_witness_root` (pure) makes root N+1 with the key added to the `witness` role
(created on first use, threshold 1 unless given) under the witness's C2SP name, and
names the log keys with the hub's origin if the root does not name them yet (roots
from before model transparency). It is signed like every rotation: by the held keys of
root N's root role, which is also root N+1's (unchanged), and checked with the device's
chain rule. The command records it as `keys.rotated` (role `witness`), so the root
history, `hub keys show` and the KV bucket `roots` work as for any rotation, and after
the commit appends the witness's vkey to HOME/witnesses so the hub stores its
cosignatures (hub/log/checkpointer.py). See docs/PROTOCOL.md ("Model transparency").

Removal (`plan_witness_removal`) is root N+1 without the key, recorded as `keys.revoked`
(role `witness`); the hub then stops storing that witness's cosignatures. It never
lowers the threshold on its own (that is a security decision the admin states with
`--threshold`), and it refuses to remove the last witness: devices that require
inclusion could then install nothing, so the replacement is added first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from edge_agent.trust.chain import root_document, sign_root, verify_next_root
from edge_agent.trust.root import TrustError, TrustRoot
from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Outcome, Verbs
from hub.keys.commands import RootChanges
from hub.keys.keyring import ROOT_TTL_NS, WITNESS_ROLE, KeyChange, KeyChangeRefused, plan_next_root
from hub.log.checkpointer import WITNESSES_NAME, load_witness_keys
from ledger.durable import atomic_write
from ledger.errors import NoteError
from ledger.note import CosignatureVerifier, parse_vkey, valid_key_name
from ledger.signing import PublicKey, SigningKey


def parse_witness_key(name: str, pubkey: str) -> PublicKey:
    """A witness public key from 64 hex digits, or from its cosignature vkey (whose name
    must then be `name`)."""
    if not valid_key_name(name):
        raise KeyChangeRefused(f"witness name {name!r} is not a valid C2SP key name "
                               "(no spaces, no '+')")
    text = pubkey.strip()
    if "+" in text:
        try:
            vkey = parse_vkey(text)
        except NoteError as exc:
            raise KeyChangeRefused(f"--pubkey: {exc}") from exc
        if not isinstance(vkey, CosignatureVerifier):
            raise KeyChangeRefused("--pubkey: not a cosignature (type 0x04) vkey")
        if vkey.name != name:
            raise KeyChangeRefused(f"--pubkey names witness {vkey.name!r}, not {name!r}")
        return PublicKey(vkey.public_key)
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise KeyChangeRefused("--pubkey must be 64 hex digits or a witness vkey") from exc
    if len(raw) != 32:
        raise KeyChangeRefused("--pubkey must be a 32-byte Ed25519 public key (64 hex digits)")
    return PublicKey(raw)


def plan_witness_root(
    current: TrustRoot,
    held: Sequence[SigningKey],
    name: str,
    public: PublicKey,
    origin: str,
    threshold: int | None = None,
    now: int | None = None,
) -> KeyChange:
    """Root `current.version + 1` with witness `name` (key `public`) added."""
    now = now if now is not None else time.time_ns()
    if public.keyid in current.keys:
        raise KeyChangeRefused(f"key {public.keyid} is already in the trust root")
    if name in {current.names.get(k) for k in
                (current.roles[WITNESS_ROLE].keyids if WITNESS_ROLE in current.roles else ())}:
        raise KeyChangeRefused(f"a witness named {name!r} is already in the trust root")
    if not valid_key_name(origin):
        raise KeyChangeRefused(f"origin {origin!r} is not a valid C2SP key name")
    publics = {role: [current.keys[k] for k in spec.keyids if k in current.keys]
               for role, spec in current.roles.items()}
    thresholds = {role: spec.threshold for role, spec in current.roles.items()}
    publics.setdefault(WITNESS_ROLE, []).append(public)
    thresholds[WITNESS_ROLE] = threshold if threshold is not None else thresholds.get(
        WITNESS_ROLE, 1)
    count = len(publics[WITNESS_ROLE])
    if not 1 <= thresholds[WITNESS_ROLE] <= count:
        raise KeyChangeRefused(f"threshold {thresholds[WITNESS_ROLE]} for the witness role "
                               f"needs 1 to {count} keys")
    names = dict(current.names)
    names[public.keyid] = name
    for keyid in current.roles["log"].keyids if "log" in current.roles else ():
        names.setdefault(keyid, origin)
    version = current.version + 1
    doc = root_document(publics, thresholds, version, now + ROOT_TTL_NS, names)
    signers = current.role_signers("root", list(held))
    if len(signers) < current.roles["root"].threshold:
        raise KeyChangeRefused(f"the hub holds {len(signers)} of the "
                               f"{current.roles['root'].threshold} root keys needed"
                               + ("; with the root key offline, witness changes are not "
                                  "supported yet" if not signers else ""))
    envelope = sign_root(doc, signers)
    try:
        verify_next_root(current, envelope.encode(), now)
    except TrustError as exc:
        raise KeyChangeRefused(f"the new root does not verify: {exc}") from exc
    return KeyChange(WITNESS_ROLE, public.keyid, envelope, version, thresholds[WITNESS_ROLE])


def witness_keyid(current: TrustRoot, name: str) -> str:
    """The key id of the witness named `name` in `current`, or `KeyChangeRefused`."""
    listed = current.roles[WITNESS_ROLE].keyids if WITNESS_ROLE in current.roles else ()
    for keyid in listed:
        if current.names.get(keyid) == name:
            return keyid
    known = ", ".join(sorted(current.names[k] for k in listed if k in current.names))
    raise KeyChangeRefused(f"no witness named {name!r} in trust root version "
                           f"{current.version} (witnesses: {known or 'none'})")


def plan_witness_removal(
    current: TrustRoot,
    held: Sequence[SigningKey],
    name: str,
    threshold: int | None = None,
    now: int | None = None,
) -> KeyChange:
    """Root `current.version + 1` without witness `name`."""
    keyid = witness_keyid(current, name)
    role = current.roles[WITNESS_ROLE]
    remaining = len(role.keyids) - 1
    if remaining == 0:
        raise KeyChangeRefused(
            f"{name!r} is the only witness: without one, devices running with "
            "--require-inclusion could install nothing; add its replacement first "
            "(`hub witness add`), then remove it")
    if threshold is None and role.threshold > remaining:
        raise KeyChangeRefused(
            f"devices require {role.threshold} cosignatures and {remaining} witness(es) "
            f"would be left; give --threshold 1..{remaining} to lower it, or add a "
            "witness first")
    return plan_next_root(current, held, WITNESS_ROLE, remove=keyid, threshold=threshold,
                          now=now)


def witness_vkey(name: str, public: PublicKey) -> str:
    return CosignatureVerifier(name, public.raw).vkey()


def add_to_witness_file(path: Path, vkey: str) -> None:
    """Append a witness vkey to HOME/witnesses unless it is listed already."""
    if any(w.vkey() == vkey for w in load_witness_keys(path)):
        return
    with open(path, "a") as fh:
        fh.write(f"{vkey}\n")


def remove_from_witness_file(path: Path, public_raw: bytes) -> None:
    """Drop the vkey whose Ed25519 public key is `public_raw` from HOME/witnesses,
    atomically (a crash leaves the old file or the new one)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            with contextlib.suppress(NoteError):
                vkey = parse_vkey(text)
                if isinstance(vkey, CosignatureVerifier) and vkey.public_key == public_raw:
                    continue
        kept.append(line)
    atomic_write(path, "".join(f"{line}\n" for line in kept).encode(), 0o644)


class WitnessCommands:
    def __init__(self, roots: RootChanges) -> None:
        self.roots = roots

    def handlers(self) -> Verbs:
        return Verbs(writes={"witness.add": self.add, "witness.remove": self.remove})

    def add(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name, pubkey = cmd.body.get("name"), cmd.body.get("pubkey")
        if not isinstance(name, str) or not isinstance(pubkey, str):
            raise CommandError("witness.add needs 'name' and 'pubkey' (text)")
        threshold = Body(cmd.body).positive("threshold")
        keyring = self.roots.keyring
        public = parse_witness_key(name, pubkey)
        change = plan_witness_root(keyring.root, keyring.held, name, public,
                                   self.roots.config.origin, threshold)
        vkey = witness_vkey(name, public)
        event = self.roots.event(cmd, ev.KEYS_ROTATED, change,
                                 {"key_file": "", "name": name, "vkey": vkey})
        commit_root = self.roots.commit(change)
        path = self.roots.config.home / WITNESSES_NAME

        async def effect() -> None:
            add_to_witness_file(path, vkey)  # first: the hub stores its cosignatures
            await commit_root()

        result: dict[str, Any] = {"role": WITNESS_ROLE, "name": name, "keyid": change.keyid,
                                  "version": change.version, "threshold": change.threshold,
                                  "vkey": vkey}
        return Outcome([event], result, [effect])

    def remove(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name = cmd.body.get("name")
        if not isinstance(name, str):
            raise CommandError("witness.remove needs 'name' (text)")
        threshold = Body(cmd.body).positive("threshold")
        keyring = self.roots.keyring
        keyid = witness_keyid(keyring.root, name)
        public = keyring.root.keys[keyid]
        change = plan_witness_removal(keyring.root, keyring.held, name, threshold)
        vkey = witness_vkey(name, public)
        event = self.roots.event(cmd, ev.KEYS_REVOKED, change, {
            "name": name, "vkey": vkey, "resigned_manifests": 0, "resigned_assignments": 0})
        commit_root = self.roots.commit(change)
        path = self.roots.config.home / WITNESSES_NAME

        async def effect() -> None:
            await commit_root()  # first: devices stop counting its cosignatures
            remove_from_witness_file(path, public.raw)

        result: dict[str, Any] = {"role": WITNESS_ROLE, "name": name, "keyid": keyid,
                                  "version": change.version, "threshold": change.threshold,
                                  "vkey": vkey}
        return Outcome([event], result, [effect])

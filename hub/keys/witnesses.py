"""`witness.add` / `witness.remove`: a witness's cosignature key into or out of the trust
root (model transparency).

A witness key is a public key only (the witness holds its seed; `ledger witness-key`
prints its vkey), so `hub keys rotate` (which makes a key the hub holds) does not fit.
`plan_witness_root` (pure, hub/keys/witness_roots.py) makes root N+1 with the key
added to the `witness` role (created on first use, threshold 1 unless given) under the
witness's C2SP name, and
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

With the root key offline, `hub witness add|remove` is refused with the commands to run
instead: `hub keys root prepare --add-witness NAME --pubkey KEY | --remove-witness NAME`
builds the same root N+1 (hub/keys/witness_roots.py), the offline machine signs it, and
`hub keys root import` records it through `WitnessCommands.imported`: the same event
(with `offline: true`) and the same effects (HOME/witnesses, the root published).
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from edge_agent.trust.root import TrustRoot
from hub import events as ev
from hub.commands.envelope import VerifiedCommand
from hub.commands.outcome import Body, CommandError, Outcome, Verbs
from hub.keys.commands import RootChanges
from hub.keys.keyring import WITNESS_ROLE, KeyChange
from hub.keys.witness_roots import (
    parse_witness_key,
    plan_witness_removal,
    plan_witness_root,
    witness_keyid,
    witness_vkey,
)
from hub.log.checkpointer import WITNESSES_NAME, load_witness_keys
from ledger.durable import atomic_write
from ledger.errors import NoteError
from ledger.note import CosignatureVerifier, parse_vkey


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
        public = parse_witness_key(name, pubkey)
        self.roots.require_root_key(
            f"--add-witness {shlex.quote(name)} --pubkey {public.raw.hex()}"
            + (f" --threshold {threshold}" if threshold else ""))
        keyring = self.roots.keyring
        change = plan_witness_root(keyring.root, keyring.held, name, public,
                                   self.roots.config.origin, threshold)
        return self.added(cmd, change, {})

    def remove(self, conn: Connection, cmd: VerifiedCommand) -> Outcome:
        name = cmd.body.get("name")
        if not isinstance(name, str):
            raise CommandError("witness.remove needs 'name' (text)")
        threshold = Body(cmd.body).positive("threshold")
        witness_keyid(self.roots.keyring.root, name)  # an unknown name: refused first
        self.roots.require_root_key(f"--remove-witness {shlex.quote(name)}"
                                    + (f" --threshold {threshold}" if threshold else ""))
        keyring = self.roots.keyring
        change = plan_witness_removal(keyring.root, keyring.held, name, threshold)
        return self.removed(cmd, change, {})

    def imported(self, cmd: VerifiedCommand, change: KeyChange,
                 extra: dict[str, Any]) -> Outcome:
        """A witness root signed offline (`hub keys root import`), checked already: the
        same event and effects as `add` / `remove`."""
        current = self.roots.keyring.root
        if change.keyid in current.keys:
            return self.removed(cmd, change, extra)
        return self.added(cmd, change, extra)

    def added(self, cmd: VerifiedCommand, change: KeyChange,
              extra: dict[str, Any]) -> Outcome:
        """Root N+1 with witness `change.keyid`: `keys.rotated` (role `witness`), then
        its vkey into HOME/witnesses and the root stored and published."""
        new = TrustRoot.from_envelope(change.root, allow_expired=True)  # verified already
        name, public = new.names[change.keyid], new.keys[change.keyid]
        vkey = witness_vkey(name, public)
        event = self.roots.event(cmd, ev.KEYS_ROTATED, change,
                                 {"key_file": "", "name": name, "vkey": vkey, **extra})
        commit_root = self.roots.commit(change)
        path = self.roots.config.home / WITNESSES_NAME

        async def effect() -> None:
            add_to_witness_file(path, vkey)  # first: the hub stores its cosignatures
            await commit_root()

        result: dict[str, Any] = {"role": WITNESS_ROLE, "name": name, "keyid": change.keyid,
                                  "version": change.version, "threshold": change.threshold,
                                  "vkey": vkey, **extra}
        return Outcome([event], result, [effect])

    def removed(self, cmd: VerifiedCommand, change: KeyChange,
                extra: dict[str, Any]) -> Outcome:
        """Root N+1 without witness `change.keyid`: `keys.revoked` (role `witness`), then
        the root stored and published and its vkey out of HOME/witnesses."""
        current = self.roots.keyring.root
        name, public = current.names[change.keyid], current.keys[change.keyid]
        vkey = witness_vkey(name, public)
        event = self.roots.event(cmd, ev.KEYS_REVOKED, change, {
            "name": name, "vkey": vkey, "resigned_manifests": 0, "resigned_assignments": 0,
            **extra})
        commit_root = self.roots.commit(change)
        path = self.roots.config.home / WITNESSES_NAME

        async def effect() -> None:
            await commit_root()  # first: devices stop counting its cosignatures
            remove_from_witness_file(path, public.raw)

        result: dict[str, Any] = {"role": WITNESS_ROLE, "name": name, "keyid": change.keyid,
                                  "version": change.version, "threshold": change.threshold,
                                  "vkey": vkey, **extra}
        return Outcome([event], result, [effect])

"""Which log keys were valid when: the history of trust roots recorded in the ledger (pure).

The hub records every trust root after the first in the ledger, as the signed root bytes
in the `root` field of a `keys.rotated` / `keys.revoked` entry (docs/PROTOCOL.md, "Root
rotation"). A log-key rotation is such an entry; so is a revocation. This module reads
those roots generically (the ledger does not import the hub or the agent), checks that
they form a chain, and says which log keys may sign a checkpoint of a given tree size.

Trust starts from what the auditor or witness *pins*: one or more log verifier keys
(`--log-key`, e.g. HOME/log.vkey, old or new). A checkpoint signed by a pinned key
vouches for every entry below its tree size, so for the roots recorded there; the log
keys those roots list are then trusted for the tree sizes at which the roots were in
force, and the checkpoints they sign vouch for later roots, and so on (`attested`).
Each recorded root must also follow the one before it (version + 1, signed by a
threshold of the previous root's and of its own `root` keys), so a recorded root the
root keys never agreed to stops the walk. Nothing from the hub is trusted beyond the
pinned key: the hub's word is only what its trusted log keys signed.

Validity by tree size: the root in force for a checkpoint of size S is the newest root
recorded at a seq below S. Before the first recorded root the first root (never
recorded: `hub init` writes it) was in force; its log keys are the first recorded
root's, less a log key that root added. A pinned key is valid at every size until a
root in force no longer lists it (it was revoked).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ledger.checkpoint import Checkpoint, SignedCheckpoint, open_checkpoint
from ledger.encoding import canonical_decode
from ledger.entry import Entry
from ledger.errors import CheckpointError, EncodingError, LedgerError, NoteError
from ledger.note import CosignatureVerifier, Verifier, parse_note
from ledger.signing import PublicKey

__all__ = [
    "ROOT_CHANGE_KINDS",
    "LogKeyHistory",
    "RecordedRoot",
    "RootChainError",
    "recorded_root",
]

# The hub's events that carry a signed trust root (hub/events.py) and the signature
# domain of trust roots (edge_agent/protocol/documents.py, DOMAIN_ROOT).
ROOT_CHANGE_KINDS = ("keys.rotated", "keys.revoked")
DOMAIN_ROOT = "root"
LOG_ROLE = "log"


class RootChainError(LedgerError):
    """A trust root recorded in the ledger is malformed or does not follow the one before."""


@dataclass(frozen=True)
class RecordedRoot:
    """A trust root as recorded in the ledger at entry `seq`."""

    seq: int
    version: int
    keys: dict[str, PublicKey]
    roles: dict[str, tuple[tuple[str, ...], int]]  # role -> (keyids, threshold)
    names: dict[str, str]
    signed: bytes
    signatures: tuple[tuple[str, bytes], ...]
    added_log_key: str | None = None  # a `keys.rotated` of the log role adds this key

    def log_keyids(self) -> tuple[str, ...]:
        return self.roles.get(LOG_ROLE, ((), 1))[0]

    def root_signers(self, signed: bytes, signatures: Sequence[tuple[str, bytes]]) -> int:
        """How many distinct keys of this root's `root` role signed `signed`."""
        keyids, _ = self.roles.get("root", ((), 1))
        valid = {keyid for keyid, sig in signatures
                 if keyid in keyids and keyid in self.keys
                 and self.keys[keyid].verify(DOMAIN_ROOT, signed, sig)}
        return len(valid)


def _map(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RootChainError(f"{what} is not a map")
    return value


def recorded_root(entry: Entry) -> RecordedRoot | None:
    """The trust root an entry records, or None if it records none. Raises
    `RootChainError` for a root entry whose root cannot be read or does not vouch for
    itself (a threshold of its own `root` keys)."""
    if entry.kind not in ROOT_CHANGE_KINDS:
        return None
    where = f"trust root recorded at seq {entry.seq}"
    try:
        payload = entry.payload
        envelope = _map(canonical_decode(payload["root"]), where)
        signed = envelope["signed"]
        doc = _map(canonical_decode(signed), where)
        keys = {str(k): PublicKey(bytes(_map(spec, where)["public"]))
                for k, spec in _map(doc["keys"], where).items()}
        names = {str(k): str(spec["name"]) for k, spec in doc["keys"].items() if "name" in spec}
        roles = {str(r): (tuple(str(k) for k in _map(spec, where)["keyids"]),
                          int(spec["threshold"]))
                 for r, spec in _map(doc["roles"], where).items()}
        signatures = tuple((str(s["keyid"]), bytes(s["sig"])) for s in envelope["signatures"])
        version = doc["version"]
    except (EncodingError, KeyError, TypeError, ValueError) as exc:
        raise RootChainError(f"{where} cannot be read: {exc}") from exc
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RootChainError(f"{where} has no valid version")
    for keyid, key in keys.items():
        if key.keyid != keyid:
            raise RootChainError(f"{where}: key {keyid} does not match its public key")
    added = (str(payload.get("keyid")) if entry.kind == "keys.rotated"
             and payload.get("role") == LOG_ROLE else None)
    root = RecordedRoot(entry.seq, version, keys, roles, names, bytes(signed), signatures, added)
    threshold = roles.get("root", ((), 1))[1]
    if root.root_signers(root.signed, signatures) < max(threshold, 1):
        raise RootChainError(f"{where} (version {version}) lacks a threshold of its own "
                             "root keys' signatures")
    return root


def check_chain(roots: Sequence[RecordedRoot]) -> None:
    """Each root must follow the one before: version + 1, and a threshold of the
    previous root's `root` keys signed it (its own were checked when it was read)."""
    for before, after in pairwise(roots):
        if after.version != before.version + 1:
            raise RootChainError(
                f"trust root version {after.version} (seq {after.seq}) does not follow "
                f"version {before.version} (seq {before.seq})")
        need = before.roles.get("root", ((), 1))[1]
        if before.root_signers(after.signed, after.signatures) < need:
            raise RootChainError(
                f"trust root version {after.version} (seq {after.seq}) is not signed by "
                f"{need} root key(s) of version {before.version}")


@dataclass
class LogKeyHistory:
    """The log keys valid at each tree size (see the module docstring)."""

    pinned: list[Verifier]
    roots: list[RecordedRoot] = field(default_factory=list)  # attested, chain-checked

    @property
    def origin(self) -> str:
        return self.pinned[0].name

    @classmethod
    def from_entries(cls, pinned: Sequence[Verifier], entries: Iterable[Entry],
                     notes: Sequence[bytes] = (), follow_chain: bool = False,
                     ) -> LogKeyHistory:
        """The history the recorded roots in `entries` give, attested by the signed
        checkpoint `notes` (in any order): each root is trusted once a checkpoint above
        its seq verifies with a key already trusted. With `follow_chain`, once one root
        is attested so are the recorded roots after it (the root keys vouch for each;
        a witness that was away for a whole rotation follows it so). Raises
        `RootChainError` if the recorded roots do not form a chain."""
        recorded = [r for e in entries if (r := recorded_root(e)) is not None]
        check_chain(recorded)
        history = cls(list(pinned))
        sizes = sorted({size for n in notes if (size := _size(n)) is not None})
        anchor = 0
        while True:
            trusted = [s for s in sizes if s > anchor and any(
                history.opens(n) for n in notes if _size(n) == s)]
            if not trusted:
                return history
            anchor = max(trusted)
            history.roots = [r for r in recorded if r.seq < anchor]
            if follow_chain and history.roots:
                history.roots = recorded
            sizes = [s for s in sizes if s > anchor]

    def opens(self, note: bytes) -> bool:
        try:
            self.open(note)
        except NoteError:
            return False
        return True

    def _verifier(self, keyid: str, root: RecordedRoot) -> Verifier | None:
        key = root.keys.get(keyid)
        if key is None:
            return None
        try:
            return Verifier(root.names.get(keyid, self.origin), key.raw)
        except NoteError:
            return None

    def verifiers_at(self, size: int) -> list[Verifier]:
        """The log verifiers a checkpoint of tree size `size` may be signed by."""
        if not self.roots:
            return list(self.pinned)
        in_force = [r for r in self.roots if r.seq < size]
        root = in_force[-1] if in_force else self.roots[0]
        keyids = [k for k in root.log_keyids() if in_force or k != root.added_log_key]
        out = [v for k in keyids if (v := self._verifier(k, root)) is not None]
        listed_now = {root.keys[k].raw for k in keyids if k in root.keys}
        listed_before = {r.keys[k].raw for r in in_force for k in r.log_keyids()
                         if k in r.keys}
        for pin in self.pinned:
            revoked = pin.public_key in listed_before and pin.public_key not in listed_now
            if not revoked and all(v.key_hash != pin.key_hash for v in out):
                out.append(pin)
        return out

    def open(self, note: bytes, witnesses: Sequence[CosignatureVerifier] = (),
             origin: str | None = None) -> SignedCheckpoint:
        """Verify a checkpoint note with a log key valid at its tree size; raise
        `NoteError` naming the keys tried if none signed it."""
        size = _size(note)
        if size is None:
            text, _ = parse_note(note)
            Checkpoint.parse(text)  # raises the syntax error
            raise NoteError("not a checkpoint")
        errors = []
        for verifier in self.verifiers_at(size):
            try:
                return open_checkpoint(note, verifier, witnesses, origin=origin)
            except NoteError as exc:  # not signed by this key (or badly): try the next
                errors.append(str(exc))
        tried = ", ".join(f"{v.name}+{v.key_hash:08x}" for v in self.verifiers_at(size))
        raise CheckpointError(f"checkpoint of tree size {size} is signed by no log key "
                              f"valid at that size (tried {tried}): {'; '.join(errors)}")


def _size(note: bytes) -> int | None:
    try:
        return Checkpoint.parse(parse_note(note)[0]).size
    except NoteError:
        return None

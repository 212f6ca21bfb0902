"""A checkpoint witness: cosigns a log's checkpoints only while they stay consistent.

For each log (origin) the witness remembers the last checkpoint it cosigned, and trusts
the log key it was given plus those it learned from trust roots recorded in the log
(`trust_log_keys`, after a log-key rotation: ledger/net/witness_runner.py). A new
checkpoint is cosigned (c2sp.org/tlog-cosignature, Ed25519, type 0x04) only if

1. it is a strict checkpoint signed by that log's key, and the tree hash it signs
   (ledger/checkpoint.py, `checkpoint_tree_hash`) is the one the proofs are checked
   with (otherwise: refused, no alarm: the hub or the witness's pin is wrong);
2. at the same size it has the same root (otherwise: a fork, with both notes as
   evidence);
3. at a larger size, a Merkle consistency proof (RFC 9162) shows that the remembered
   tree is a prefix of the new one (otherwise: a fork, with both notes as evidence).

A checkpoint of a smaller size than the remembered one is an old one replayed (a
redelivered message, a lagging hub replica): with a consistency proof from its size to
the remembered size it is a prefix of what the witness cosigned, and `StaleCheckpoint`
says so (not cosigned, not an alarm); a proof that fails is a fork.

The logic is pure; the only I/O is `WitnessState`, one small JSON file replaced
atomically (temp file, fsync, rename, directory fsync). One process owns a state file.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ledger.checkpoint import Checkpoint, cosign, open_checkpoint, tree_hash_problem
from ledger.durable import atomic_write
from ledger.errors import (
    NoteError,
    ProofError,
    StaleCheckpoint,
    WitnessError,
    WitnessStateError,
)
from ledger.merkle import TreeHash, verify_consistency
from ledger.note import CosignatureSigner, CosignatureVerifier, Verifier, parse_note
from ledger.signing import SigningKey

STATE_FORMAT = "fleetledger-witness-state/1"


def _checkpoint_of(note: bytes) -> Checkpoint:
    """The checkpoint in a signed note, syntax only (no signature is checked)."""
    text, _ = parse_note(note)
    return Checkpoint.parse(text)


class WitnessState:
    """The last cosigned checkpoint note per origin, in a JSON file.

    The file is read once when the state is opened and rewritten atomically on every
    `record`. A missing file is an empty state; an unreadable or corrupt one raises
    `WitnessStateError` (a witness that forgot what it cosigned could be made to
    cosign a fork).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._notes: dict[str, bytes] = self._load()

    def _load(self) -> dict[str, bytes]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise WitnessStateError(f"cannot read witness state {self.path}: {exc}") from exc
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WitnessStateError(f"witness state {self.path} is not valid JSON: {exc}") from exc
        if (
            not isinstance(doc, dict)
            or doc.get("format") != STATE_FORMAT
            or not isinstance(doc.get("checkpoints"), dict)
        ):
            raise WitnessStateError(f"witness state {self.path} is not a {STATE_FORMAT} document")
        notes: dict[str, bytes] = {}
        for origin, text in doc["checkpoints"].items():
            if not isinstance(text, str):
                raise WitnessStateError(f"witness state {self.path}: entry {origin!r} is not text")
            note = text.encode("utf-8")
            try:
                cp = _checkpoint_of(note)
            except NoteError as exc:
                raise WitnessStateError(
                    f"witness state {self.path}: the checkpoint for {origin!r} is corrupt: {exc}"
                ) from exc
            if cp.origin != origin:
                raise WitnessStateError(
                    f"witness state {self.path}: the checkpoint filed under {origin!r} "
                    f"is for {cp.origin!r}"
                )
            notes[origin] = note
        return notes

    def latest(self, origin: str) -> bytes | None:
        """The last checkpoint note cosigned for `origin` (with this witness's
        cosignature), or None."""
        return self._notes.get(origin)

    def origins(self) -> list[str]:
        return sorted(self._notes)

    def record(self, origin: str, note: bytes) -> None:
        """Remember `note` as the latest for `origin`, durably, before returning."""
        notes = {**self._notes, origin: bytes(note)}
        doc = {
            "format": STATE_FORMAT,
            "checkpoints": {o: n.decode("utf-8") for o, n in sorted(notes.items())},
        }
        self._write(json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")
        self._notes = notes

    def _write(self, data: bytes) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data, 0o644)
        except OSError as exc:
            raise WitnessStateError(f"cannot write witness state {self.path}: {exc}") from exc


def _unix_now() -> int:
    return int(time.time())


class Witness:
    """Cosigns checkpoints of the logs it knows (origin -> the log's note verifier)."""

    def __init__(
        self,
        name: str,
        key: SigningKey,
        logs: Mapping[str, Verifier],
        state: WitnessState,
        clock: Callable[[], int] = _unix_now,
    ) -> None:
        self.name = name
        self._key = key
        self._signer = CosignatureSigner.from_signing_key(name, key)
        # origin -> the log keys trusted for it: the pinned one, then those learned
        # from trust roots recorded in the log (`trust_log_keys`, a log-key rotation).
        self._logs: dict[str, list[Verifier]] = {o: [v] for o, v in logs.items()}
        self._state = state
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def verifier(self) -> CosignatureVerifier:
        """What a client configures to check this witness's cosignatures."""
        return self._signer.verifier()

    def log_keys(self, origin: str) -> list[Verifier]:
        """The log keys this witness trusts for `origin` (none: an unknown log)."""
        return list(self._logs.get(origin, []))

    def trust_log_keys(self, origin: str, keys: Sequence[Verifier]) -> list[Verifier]:
        """Trust `keys` for `origin` too (the caller verified that trust roots recorded
        in the log name them); returns those that are new."""
        with self._lock:
            known = self._logs.setdefault(origin, [])
            new = [k for k in keys if k.name == origin and k not in known]
            known.extend(new)
            return new

    def signed_by_known_key(self, note: bytes) -> bool:
        """Whether a trusted log key of the note's origin signed it (False for a note
        that is not a checkpoint or of an unknown log)."""
        try:
            origin = _checkpoint_of(note).origin
        except NoteError:
            return False
        for log in self._logs.get(origin, []):
            try:
                open_checkpoint(note, log, origin=origin)
                return True
            except NoteError:
                continue
        return False

    def latest_note(self, origin: str) -> bytes | None:
        """The last cosigned checkpoint note of `origin`, as stored."""
        return self._state.latest(origin)

    def latest(self, origin: str) -> Checkpoint | None:
        """The last checkpoint cosigned for `origin`: the log must send a consistency
        proof from its size."""
        note = self._state.latest(origin)
        return None if note is None else _checkpoint_of(note)

    def consider(
        self, new_note: bytes, consistency_proof: Sequence[bytes], tree_hash: TreeHash
    ) -> bytes:
        """Cosign `new_note` if it is consistent with the last checkpoint cosigned for its
        log; return the note with this witness's cosignature added.

        `consistency_proof` goes from the size of `latest(origin)` to the new size
        (empty when there is no earlier checkpoint, or the size is unchanged); for a
        checkpoint smaller than `latest(origin)`, from its size to the latest's.
        `tree_hash` is the log's Merkle hash function: it must be the one the checkpoint
        signs. Raises `StaleCheckpoint` for an old, consistent checkpoint and
        `WitnessError` otherwise.
        """
        with self._lock:
            return self._consider(bytes(new_note), list(consistency_proof), tree_hash)

    def _consider(self, new_note: bytes, proof: list[bytes], th: TreeHash) -> bytes:
        try:
            origin = _checkpoint_of(new_note).origin
        except NoteError as exc:
            raise WitnessError(f"refused: not a checkpoint note: {exc}") from exc
        logs = self._logs.get(origin)
        if not logs:
            known = ", ".join(sorted(self._logs)) or "none"
            raise WitnessError(f"refused: unknown log {origin!r} (this witness knows: {known})")
        errors = []
        for log in logs:  # after a log-key rotation, any trusted key of the log
            try:
                new = open_checkpoint(new_note, log, origin=origin).checkpoint
                break
            except NoteError as exc:
                errors.append(str(exc))
        else:
            raise WitnessError(f"refused checkpoint of {origin}: {'; '.join(errors)}")
        mismatch = tree_hash_problem(new, th.name)
        if mismatch is not None:
            raise WitnessError(f"refused checkpoint of {origin}: {mismatch}")
        old_note = self._state.latest(origin)
        if old_note is None:
            if proof:
                raise WitnessError(
                    f"refused checkpoint of {origin}: this witness has no earlier checkpoint "
                    f"of it, so the consistency proof must be empty (got {len(proof)} hashes)"
                )
        else:
            self._check_consistent(origin, old_note, new_note, new, proof, th)
        cosigned = cosign(new_note, self._key, self.name, self._clock())
        self._state.record(origin, cosigned)
        return cosigned

    def _check_consistent(
        self,
        origin: str,
        old_note: bytes,
        new_note: bytes,
        new: Checkpoint,
        proof: list[bytes],
        th: TreeHash,
    ) -> None:
        old = _checkpoint_of(old_note)
        if new.size < old.size:
            try:
                verify_consistency(th, new.size, old.size, new.root, old.root, proof)
            except ProofError as exc:
                raise WitnessError(
                    f"FORK of {origin}: the tree of size {new.size} is not a prefix of the "
                    f"tree of size {old.size} this witness cosigned: {exc}",
                    old_note,
                    new_note,
                ) from exc
            raise StaleCheckpoint(
                f"ignored an old checkpoint of {origin}: tree size {new.size} is a prefix "
                f"of size {old.size}, which this witness already cosigned"
            )
        if new.size == old.size and new.root != old.root:
            raise WitnessError(
                f"FORK of {origin}: two checkpoints of tree size {new.size} signed by the "
                "log have different roots",
                old_note,
                new_note,
            )
        try:
            verify_consistency(th, old.size, new.size, old.root, new.root, proof)
        except ProofError as exc:
            raise WitnessError(
                f"FORK of {origin}: the tree of size {new.size} is not consistent with the "
                f"tree of size {old.size} this witness cosigned: {exc}",
                old_note,
                new_note,
            ) from exc

"""C2SP tlog-checkpoint: the signed tree head of the ledger's Merkle tree (pure, no I/O).

A checkpoint's text (c2sp.org/tlog-checkpoint) is at least three non-empty lines::

    <origin>\\n                 e.g. fleetledger.example/hub-1
    <tree size>\\n              ASCII decimal, no leading zeros ("0" for the empty tree)
    <base64(root hash)>\\n      RFC 9162 Merkle tree root, 32 bytes
    [<extension line>\\n ...]   optional, opaque, non-empty

It travels as a signed note (ledger/note.py) signed by the log's Ed25519 key, whose key
name is the origin. Witnesses add Ed25519 cosignatures (type 0x04, c2sp.org/
tlog-cosignature) after checking consistency with the last checkpoint they cosigned
(ledger/witness.py). Two checkpoints of one origin and size with different roots
prove that the log forked: `detect_fork`.

The Merkle tree's hash function is part of the signed text. tlog-checkpoint defines the
root as an RFC 6962 (SHA-256) tree's, so a SHA-256 checkpoint has no extension line
and is a standard checkpoint; a log with another tree hash (BLAKE3) signs it in one
extension line, ``fleetledger-merkle-hash blake3``. `checkpoint_tree_hash` reads it and
`tree_hash_problem` is the one rule every verifier applies (docs/PROTOCOL.md,
"Tree hash binding").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ledger.errors import CheckpointError, NoteError
from ledger.merkle import HASHES, SHA256
from ledger.note import (
    CosignatureSigner,
    CosignatureVerifier,
    Signer,
    Verifier,
    add_signatures,
    b64decode_strict,
    b64encode,
    cosignature_timestamp,
    open_note,
    parse_note,
    sign_note,
)
from ledger.signing import SigningKey

ROOT_SIZE = 32
# Tree sizes are uint64 in the C2SP/Go ecosystem.
MAX_TREE_SIZE = 2**64 - 1
_SIZE_LINE = re.compile(r"0|[1-9][0-9]{0,19}")
_CONTROL = re.compile(r"[\x00-\x1f]")


def _check_line(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise CheckpointError(f"checkpoint {what} must be text, got {type(value).__name__}")
    if not value:
        raise CheckpointError(f"checkpoint {what} must not be empty")
    bad = _CONTROL.search(value)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {what} contains control character U+{ord(bad.group()):04X} "
            "(newlines separate lines; CR and tab are not allowed)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CheckpointError(f"checkpoint {what} is not encodable as UTF-8") from exc
    return value


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: origin, tree size, root hash, and (rarely) extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line("origin", self.origin)
        if not isinstance(self.size, int) or isinstance(self.size, bool):
            raise CheckpointError(f"tree size must be an integer, got {self.size!r:.40}")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError(f"tree size must be between 0 and 2**64-1, got {self.size}")
        if not isinstance(self.root, bytes) or len(self.root) != ROOT_SIZE:
            raise CheckpointError(f"root hash must be {ROOT_SIZE} bytes, got {self.root!r:.80}")
        if not isinstance(self.extensions, tuple):
            raise CheckpointError("extensions must be a tuple of lines")
        for i, line in enumerate(self.extensions):
            _check_line(f"extension line {i + 1}", line)

    def body(self) -> str:
        """The note text: origin, size, base64 root, extension lines, each ending in \\n."""
        lines = [self.origin, str(self.size), b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Read a checkpoint's note text strictly; `parse(cp.body()) == cp` always holds
        and every accepted text is exactly `body()` of its result."""
        if not isinstance(text, str):
            raise CheckpointError(f"checkpoint text must be str, got {type(text).__name__}")
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint text must end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(
                f"checkpoint text has {len(lines)} line(s); it needs origin, tree size "
                "and root hash"
            )
        for i, line in enumerate(lines):
            if not line:
                raise CheckpointError(f"checkpoint line {i + 1} is empty")
        origin, size_line, root_line, *extensions = lines
        if not _SIZE_LINE.fullmatch(size_line):
            raise CheckpointError(
                f"checkpoint tree size {size_line[:40]!r} is not a decimal number without "
                "leading zeros"
            )
        try:
            root = b64decode_strict(root_line, "checkpoint root hash")
        except NoteError as exc:
            raise CheckpointError(str(exc)) from exc
        return cls(origin, int(size_line), root, tuple(extensions))


TREE_HASH_EXTENSION = "fleetledger-merkle-hash"
UNSTATED_TREE_HASH = SHA256.name  # tlog-checkpoint: the root of an RFC 6962 tree


def tree_hash_extensions(tree_hash: str) -> tuple[str, ...]:
    """The extension lines a log with Merkle tree hash `tree_hash` signs: none for
    SHA-256 (a standard checkpoint), else ``fleetledger-merkle-hash NAME``."""
    if tree_hash not in HASHES:
        raise CheckpointError(f"unknown Merkle tree hash {tree_hash!r}")
    return () if tree_hash == UNSTATED_TREE_HASH else (f"{TREE_HASH_EXTENSION} {tree_hash}",)


def stated_tree_hash(cp: Checkpoint) -> str | None:
    """The tree hash the checkpoint's signed text names, or None when it names none.
    Raises `CheckpointError` for a malformed, unknown or repeated tree-hash line."""
    found = [line for line in cp.extensions
             if line.split(" ", 1)[0] == TREE_HASH_EXTENSION]
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(f"checkpoint has {len(found)} {TREE_HASH_EXTENSION} lines")
    name = found[0][len(TREE_HASH_EXTENSION) + 1:]
    if name not in HASHES or name == UNSTATED_TREE_HASH:
        raise CheckpointError(f"checkpoint line {found[0]!r}: not a tree hash a log "
                              f"states ({', '.join(h for h in HASHES if h != 'sha256')})")
    return name


def checkpoint_tree_hash(cp: Checkpoint) -> str:
    """The Merkle tree hash the log signed for `cp`: its tree-hash line, else SHA-256."""
    return stated_tree_hash(cp) or UNSTATED_TREE_HASH


def tree_hash_problem(cp: Checkpoint, claimed: str, *, legacy: bool = False) -> str | None:
    """None if `claimed` (what a bundle, export, ledger or hub says) is the tree hash the
    checkpoint signs, else the problem. With `legacy`, a checkpoint without a tree-hash
    line may also be a BLAKE3 one signed before fleetledger bound the hash (only for
    verifiers that recompute the root from the entries themselves)."""
    try:
        signed = checkpoint_tree_hash(cp)
    except CheckpointError as exc:
        return str(exc)
    if signed == claimed:
        return None
    if legacy and stated_tree_hash(cp) is None:
        return None
    how = "its tree-hash line" if stated_tree_hash(cp) else "no tree-hash line: RFC 6962"
    return (f"tree hash mismatch: {claimed} is claimed, the checkpoint of tree size "
            f"{cp.size} is signed for {signed} ({how})")


@dataclass(frozen=True)
class Cosignature:
    """A verified witness cosignature: who, and when (POSIX seconds) they signed."""

    name: str
    key_hash: int
    timestamp: int


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint whose log signature verified, with the cosignatures that verified.

    `note` is the signed note exactly as received (fork evidence must be the log's own
    bytes).
    """

    checkpoint: Checkpoint
    note: bytes
    cosignatures: tuple[Cosignature, ...] = ()

    def cosigned_by(self, name: str) -> bool:
        return any(c.name == name for c in self.cosignatures)


def sign_checkpoint(cp: Checkpoint, log_signer: Signer, *more: Signer) -> bytes:
    """The checkpoint as a signed note, signed by the log. The log's key name must be the
    origin (tlog-checkpoint: "SHOULD match"; here it is required, so a verifier's
    configured key name also names the log). `more` are further log keys under the same
    origin (during a log-key rotation): verifiers ignore signatures by keys they do not
    know, so each one checks with whichever key it was given."""
    for signer in (log_signer, *more):
        if signer.name != cp.origin:
            raise CheckpointError(
                f"log key name {signer.name!r} must equal the checkpoint origin {cp.origin!r}"
            )
    return sign_note(cp.body(), [log_signer, *more])


def open_checkpoint(
    data: bytes,
    log_verifier: Verifier,
    witness_verifiers: Iterable[CosignatureVerifier] = (),
    *,
    origin: str | None = None,
) -> SignedCheckpoint:
    """Verify a signed checkpoint: the log's signature must verify, the text must be a
    strict checkpoint, and its origin must be `origin` (default: the log key's name).

    A signature from any known key (the log or a listed witness) that fails to verify
    is an error; signatures from other keys are ignored. Raises `NoteError` (malformed
    note, bad signature) or its subclass `CheckpointError`.
    """
    witnesses = list(witness_verifiers)
    note = open_note(data, [log_verifier, *witnesses])
    log_key = (log_verifier.name, log_verifier.key_hash)
    if not any((s.name, s.key_hash) == log_key for s in note.sigs):
        signed_by = ", ".join(s.key_id for s in note.sigs)
        raise CheckpointError(
            f"checkpoint is not signed by the log key {log_key[0]}+{log_key[1]:08x} "
            f"(verified signatures: {signed_by})"
        )
    cp = Checkpoint.parse(note.text)
    expected = log_verifier.name if origin is None else origin
    if cp.origin != expected:
        raise CheckpointError(f"checkpoint origin is {cp.origin!r}, expected {expected!r}")
    witness_keys = {(w.name, w.key_hash) for w in witnesses}
    cosignatures = tuple(
        Cosignature(s.name, s.key_hash, cosignature_timestamp(s))
        for s in note.sigs
        if (s.name, s.key_hash) in witness_keys
    )
    return SignedCheckpoint(cp, bytes(data), cosignatures)


def cosign(signed_note: bytes, witness_key: SigningKey, witness_name: str, timestamp: int) -> bytes:
    """Add the witness's Ed25519 cosignature (cosignature/v1 at `timestamp`, POSIX
    seconds) to a signed checkpoint, replacing an earlier cosignature by the same key.

    This only signs: checking the log's signature and consistency with what the witness
    saw before is the caller's job (`ledger.witness.Witness.consider` does both).
    """
    text, _ = parse_note(signed_note)
    Checkpoint.parse(text)
    signer = CosignatureSigner.from_signing_key(witness_name, witness_key)
    return add_signatures(signed_note, [signer.signature(text, timestamp)])


@dataclass(frozen=True)
class ForkEvidence:
    """Two checkpoints, both signed by the log, of the same origin and size with
    different roots: the log showed two different histories."""

    origin: str
    size: int
    root_a: bytes
    root_b: bytes
    note_a: bytes
    note_b: bytes

    def __str__(self) -> str:
        return (
            f"fork in log {self.origin} at tree size {self.size}: two checkpoints signed "
            f"by the log have different roots\n"
            f"  root A: {b64encode(self.root_a)}\n"
            f"  root B: {b64encode(self.root_b)}\n"
            f"--- checkpoint A ---\n{self.note_a.decode('utf-8', 'replace')}"
            f"--- checkpoint B ---\n{self.note_b.decode('utf-8', 'replace')}"
        )


def detect_fork(a: SignedCheckpoint, b: SignedCheckpoint) -> ForkEvidence | None:
    """Fork evidence if `a` and `b` (both opened with `open_checkpoint`) are of the same
    origin and size with different roots; otherwise None.

    Checkpoints of different sizes can also be inconsistent; finding that needs a
    consistency proof (the witness does it), not just the two checkpoints.
    """
    ca, cb = a.checkpoint, b.checkpoint
    if ca.origin != cb.origin or ca.size != cb.size or ca.root == cb.root:
        return None
    return ForkEvidence(ca.origin, ca.size, ca.root, cb.root, a.note, b.note)

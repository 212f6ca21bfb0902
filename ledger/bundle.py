"""Proof bundles: one entry with everything needed to check, offline, that it is in the
log the hub signed (and witnesses cosigned), without the rest of the ledger.

A bundle is one canonical msgpack map (docs/PROTOCOL.md, "Proof bundle")::

    {"format": "fleetledger-proof/1", "merkle_hash": "blake3"|"sha256",
     "seq": int, "body": bin, "prev": bin, "hash": bin,
     "tree_size": int, "inclusion_proof": [bin, ...], "checkpoint": bin}

`checkpoint` is the signed checkpoint note of `tree_size` with its cosignatures.
`merkle_hash` is not signed; it must be the tree hash the checkpoint signs
(ledger/checkpoint.py, `tree_hash_problem`), else the bundle is refused.

This module is the format and its offline check (the device uses it without a database);
`ledger/storage/bundles.py` makes bundles from a store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ledger.checkpoint import SignedCheckpoint, open_checkpoint, tree_hash_problem
from ledger.encoding import canonical_decode
from ledger.entry import Entry
from ledger.errors import BundleError, EncodingError, EntryError, NoteError, ProofError
from ledger.merkle import HASHES, verify_inclusion
from ledger.note import CosignatureVerifier, Verifier

BUNDLE_FORMAT = "fleetledger-proof/1"
BUNDLE_KEYS = frozenset({"format", "merkle_hash", "seq", "body", "prev", "hash", "tree_size",
                         "inclusion_proof", "checkpoint"})


@dataclass(frozen=True)
class BundleReport:
    entry: Entry
    checkpoint: SignedCheckpoint
    proof_length: int
    merkle_hash: str

    @property
    def witnesses(self) -> list[str]:
        return sorted({c.name for c in self.checkpoint.cosignatures})


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BundleError(f"bundle field {name!r} must be {kind.__name__}")
    return value


def verify_bundle(
    data: bytes,
    log_verifier: Verifier,
    witness_verifiers: Sequence[CosignatureVerifier] = (),
    min_witnesses: int | None = None,
) -> BundleReport:
    """Check a bundle offline; raise `BundleError` naming the failed check.

    The checkpoint must be signed by the log, for the tree hash the bundle names; the
    leaf HASH(0x00 || body) with the inclusion proof must lead to the checkpoint's root
    at its size; the entry's chain
    hash must match its prev and body; at least `min_witnesses` (default: all of
    `witness_verifiers`) distinct listed witnesses must have cosigned the checkpoint,
    and every cosignature by a listed witness must verify.
    """
    try:
        doc = canonical_decode(data)
    except EncodingError as exc:
        raise BundleError(f"not a proof bundle (canonical msgpack): {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != BUNDLE_KEYS:
        raise BundleError(f"not a {BUNDLE_FORMAT} bundle: keys must be {sorted(BUNDLE_KEYS)}")
    if doc["format"] != BUNDLE_FORMAT:
        raise BundleError(f"bundle format {doc['format']!r}, expected {BUNDLE_FORMAT!r}")
    th = HASHES.get(_field(doc, "merkle_hash", str))
    if th is None:
        raise BundleError(f"unknown Merkle tree hash {doc['merkle_hash']!r}")
    seq, size = _field(doc, "seq", int), _field(doc, "tree_size", int)
    proof = _field(doc, "inclusion_proof", list)
    if not all(isinstance(h, bytes) for h in proof):
        raise BundleError("inclusion_proof must be a list of bin")
    try:
        entry = Entry.from_body(_field(doc, "body", bytes), _field(doc, "prev", bytes),
                                _field(doc, "hash", bytes))
    except EntryError as exc:
        raise BundleError(f"the entry cannot be read: {exc}") from exc
    if entry.seq != seq:
        raise BundleError(f"the entry's body says seq {entry.seq}, the bundle says {seq}")
    if not entry.hash_matches():
        raise BundleError(f"entry {seq}: its hash does not match its prev and body")
    witnesses = list(witness_verifiers)
    try:
        signed = open_checkpoint(_field(doc, "checkpoint", bytes), log_verifier, witnesses)
    except NoteError as exc:
        raise BundleError(f"checkpoint: {exc}") from exc
    if signed.checkpoint.size != size:
        raise BundleError(f"the checkpoint is of tree size {signed.checkpoint.size}, the "
                          f"bundle says {size}")
    mismatch = tree_hash_problem(signed.checkpoint, th.name)
    if mismatch is not None:
        raise BundleError(f"bundle merkle_hash: {mismatch}")
    try:
        verify_inclusion(th, seq, size, th.leaf(entry.body), proof, signed.checkpoint.root)
    except ProofError as exc:
        raise BundleError(f"inclusion proof: {exc}") from exc
    need = len(witnesses) if min_witnesses is None else min_witnesses
    cosigned = {(c.name, c.key_hash) for c in signed.cosignatures}
    if len(cosigned) < need:
        names = ", ".join(sorted(n for n, _ in cosigned)) or "none"
        raise BundleError(f"the checkpoint is cosigned by {len(cosigned)} of the given "
                          f"witnesses ({names}); {need} required")
    return BundleReport(entry, signed, len(proof), th.name)

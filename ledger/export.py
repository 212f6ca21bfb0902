"""The portable export file: a whole ledger (entries + signed checkpoints) in one file
that `ledger verify FILE` checks offline, with nothing but the log's verifier key.

Format (docs/PROTOCOL.md, "Export file"): a sequence of frames, each a 4-byte
big-endian length followed by that many bytes of canonical msgpack:

1. the header map ``{"format": "fleetledger-export/1", "hash": "blake3",
   "merkle_hash": "blake3"|"sha256", "origin": text|nil, "entries": N,
   "checkpoints": K}`` (exactly these keys);
2. K checkpoint frames, each a ``bin``: a signed checkpoint note (log signature plus
   any cosignatures), tree sizes strictly increasing, each at most N;
3. N entry frames, each the array ``[body, prev, hash]`` (three ``bin``), seq 0 first;

and nothing after. Checkpoints come first so that a verifier streaming the entries
knows at which sizes to take the Merkle root (O(K + log N) memory).

This module is the format and its offline check; `ledger/storage/export.py` writes it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

from ledger.checkpoint import (
    UNSTATED_TREE_HASH,
    Checkpoint,
    SignedCheckpoint,
    detect_fork,
    open_checkpoint,
    stated_tree_hash,
    tree_hash_problem,
)
from ledger.encoding import MAX_DOCUMENT_BYTES, canonical_decode, canonical_encode
from ledger.entry import GENESIS_PREV, HASH_NAME, Entry
from ledger.errors import EncodingError, EntryError, ExportError, NoteError
from ledger.log_keys import LogKeyHistory
from ledger.merkle import HASHES, MerkleFrontier
from ledger.note import CosignatureVerifier, Verifier, b64encode, parse_note
from ledger.verify import RawRow, row_problem

EXPORT_FORMAT = "fleetledger-export/1"
HEADER_KEYS = frozenset({"format", "hash", "merkle_hash", "origin", "entries", "checkpoints"})
_LENGTH = struct.Struct(">I")
# An entry frame is a body (at most 4 MiB) plus two hashes and a few header bytes.
MAX_FRAME_BYTES = MAX_DOCUMENT_BYTES + 1024


def frame(doc: Any) -> bytes:
    """One frame: the 4-byte big-endian length, then `doc` (bytes as is, else canonical msgpack)."""
    data = canonical_encode(doc) if not isinstance(doc, bytes) else doc
    return _LENGTH.pack(len(data)) + data


@dataclass(frozen=True)
class ExportResult:
    """Outcome of `verify_export`. On failure `first_bad_seq` names the entry (None when
    the damage is in the header or a checkpoint) and `problem` says what is wrong."""

    ok: bool
    entries: int
    head_hash: bytes | None
    merkle_hash: str
    root: bytes | None
    checkpoints: list[SignedCheckpoint] = field(default_factory=list)
    signatures_checked: bool = True
    # Checkpoints given besides the file's (`ledger verify FILE --checkpoint`), checked too.
    given: list[SignedCheckpoint] = field(default_factory=list)
    # Checkpoints without a tree-hash line accepted for a BLAKE3 export (signed before
    # fleetledger bound the tree hash; their roots are recomputed here all the same).
    legacy_tree_hash: int = 0
    first_bad_seq: int | None = None
    problem: str | None = None


class _Reader:
    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.frames = 0

    def frame(self, what: str) -> Any:
        head = self.fh.read(_LENGTH.size)
        if len(head) != _LENGTH.size:
            raise ExportError(f"{what}: the file ends early (frame {self.frames})")
        (length,) = _LENGTH.unpack(head)
        if length > MAX_FRAME_BYTES:
            raise ExportError(f"{what}: frame {self.frames} claims {length} bytes")
        data = self.fh.read(length)
        if len(data) != length:
            raise ExportError(f"{what}: the file ends early (frame {self.frames})")
        self.frames += 1
        try:
            return canonical_decode(data, max_bytes=MAX_FRAME_BYTES)
        except EncodingError as exc:
            raise ExportError(f"{what}: not canonical msgpack: {exc}") from exc


def _header(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or set(doc) != HEADER_KEYS:
        raise ExportError(f"header: not a {EXPORT_FORMAT} header (keys {sorted(HEADER_KEYS)})")
    if doc["format"] != EXPORT_FORMAT:
        raise ExportError(f"header: format {doc['format']!r}, expected {EXPORT_FORMAT!r}")
    if doc["hash"] != HASH_NAME:
        raise ExportError(f"header: chain hash {doc['hash']!r}, expected {HASH_NAME!r}")
    if doc["merkle_hash"] not in HASHES:
        raise ExportError(f"header: unknown merkle_hash {doc['merkle_hash']!r}")
    for key in ("entries", "checkpoints"):
        if not isinstance(doc[key], int) or isinstance(doc[key], bool) or doc[key] < 0:
            raise ExportError(f"header: {key} must be a non-negative integer")
    if not (doc["origin"] is None or isinstance(doc["origin"], str)):
        raise ExportError("header: origin must be text or nil")
    if doc["checkpoints"] and doc["origin"] is None:
        raise ExportError("header: checkpoints without an origin")
    return doc


def verify_export(
    path: Path,
    log_verifier: Verifier | LogKeyHistory | None,
    witness_verifiers: Sequence[CosignatureVerifier] = (),
    given: Sequence[SignedCheckpoint] = (),
) -> ExportResult:
    """Check an export file offline: framing, the hash chain (as `ledger verify`), the
    Merkle tree recomputed from the bodies, and every checkpoint: signed by the log
    (when `log_verifier` is given, by a log key valid at its tree size for a
    `LogKeyHistory`; else only its text is read), of the header's origin,
    signed for the header's tree hash, and its root equal to the recomputed root at its
    size. `given` are more signed checkpoints (opened by the caller) the file must agree
    with the same way: it must reach their sizes and have their roots there. Raises
    `ExportError` when the file is not an export at all; damage is reported in the
    result."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    with fh:
        reader = _Reader(fh)
        header = _header(reader.frame("header"))
        th = HASHES[header["merkle_hash"]]
        checked = log_verifier is not None

        def fail(problem: str, seq: int | None, count: int = 0, head: bytes | None = None,
                 cps: list[SignedCheckpoint] | None = None) -> ExportResult:
            return ExportResult(False, count, head, th.name, None, cps or [], checked,
                                list(given), 0, seq, problem)

        cps: list[SignedCheckpoint] = []
        try:
            for i in range(header["checkpoints"]):
                note = reader.frame(f"checkpoint {i}")
                if not isinstance(note, bytes):
                    return fail(f"checkpoint {i}: not a note (bin)", None)
                cps.append(_open(note, header["origin"], log_verifier, witness_verifiers))
        except (NoteError, ExportError) as exc:
            return fail(f"checkpoint {len(cps)}: {exc}", None)
        for a, b in pairwise(cps):
            fork = detect_fork(a, b)
            if fork is not None:
                return fail(str(fork), None, cps=cps)
            if b.checkpoint.size <= a.checkpoint.size:
                return fail("checkpoints are not in increasing tree size order", None, cps=cps)
        for cp in [*cps, *given]:
            if header["origin"] is not None and cp.checkpoint.origin != header["origin"]:
                return fail(f"a given checkpoint is of origin {cp.checkpoint.origin!r}, the "
                            f"file's of {header['origin']!r}", None, cps=cps)
            mismatch = tree_hash_problem(cp.checkpoint, th.name, legacy=True)
            if mismatch is not None:
                return fail(f"header merkle_hash: {mismatch}", None, cps=cps)
        legacy = sum(1 for cp in cps if th.name != UNSTATED_TREE_HASH
                     and stated_tree_hash(cp.checkpoint) is None)
        everything = [*cps, *given]
        for i, a in enumerate(everything):
            for b in everything[i + 1:]:
                fork = detect_fork(a, b)
                if fork is not None:
                    return fail(str(fork), None, cps=cps)
        largest = max((cp.checkpoint.size for cp in everything), default=0)
        if largest > header["entries"]:
            return fail(f"truncation below a signed checkpoint: it covers {largest} entries, "
                        f"the file has {header['entries']}", header["entries"], cps=cps)
        wanted = {cp.checkpoint.size: cp for cp in everything}
        frontier = MerkleFrontier(th)
        prev, head = GENESIS_PREV, None
        if 0 in wanted:
            found = _root_problem(wanted[0], th.empty())
            if found:
                return fail(found, None, cps=cps)
        for seq in range(header["entries"]):
            try:
                row = _entry_row(reader.frame(f"entry {seq}"), seq)
            except (ExportError, EntryError) as exc:
                return fail(f"entry frame cannot be read: {exc}", seq, seq, head, cps)
            found_row = row_problem(row, seq, prev)
            if found_row is not None:
                return fail(found_row[1], found_row[0], seq, head, cps)
            frontier.append(th.leaf(row.body))
            prev = head = row.hash
            at = wanted.get(seq + 1)
            if at is not None:
                found = _root_problem(at, frontier.root())
                if found:
                    return fail(found, seq, seq + 1, head, cps)
        if fh.read(1):
            return fail("trailing bytes after the last entry", None, header["entries"], head, cps)
    return ExportResult(True, header["entries"], head, th.name, frontier.root(), cps, checked,
                        list(given), legacy)


def _open(note: bytes, origin: str, log: Verifier | LogKeyHistory | None,
          witnesses: Sequence[CosignatureVerifier]) -> SignedCheckpoint:
    if log is None:
        text, _ = parse_note(note)
        cp = Checkpoint.parse(text)
        if cp.origin != origin:
            raise ExportError(f"origin {cp.origin!r}, the header says {origin!r}")
        return SignedCheckpoint(cp, note)
    if isinstance(log, LogKeyHistory):
        return log.open(note, witnesses, origin=origin)
    return open_checkpoint(note, log, witnesses, origin=origin)


def _root_problem(cp: SignedCheckpoint, root: bytes) -> str | None:
    if cp.checkpoint.root == root:
        return None
    return (f"fork: the ledger disagrees with a signed checkpoint at tree size "
            f"{cp.checkpoint.size}\n  checkpoint root: {b64encode(cp.checkpoint.root)}\n"
            f"  entries' root:   {b64encode(root)}")


def _entry_row(doc: Any, seq: int) -> RawRow:
    if not (isinstance(doc, list) and len(doc) == 3 and all(isinstance(x, bytes) for x in doc)):
        raise ExportError("not an array [body, prev, hash] of three bin")
    body, prev, digest = doc
    entry = Entry.from_body(body, prev, digest)
    return RawRow(entry.seq, entry.ts, entry.kind, entry.actor, entry.subject, body, prev, digest)


@dataclass(frozen=True)
class ExportContents:
    """An export file read into memory (framing and entry decoding checked, not the
    chain: run `verify_export` for that)."""

    merkle_hash: str
    origin: str | None
    checkpoints: list[bytes]  # signed notes, smallest tree size first
    entries: list[Entry]


def read_export(path: Path) -> ExportContents:
    """Every checkpoint note and entry of an export file; raise `ExportError` when it
    cannot be read as one."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    with fh:
        reader = _Reader(fh)
        header = _header(reader.frame("header"))
        notes = [reader.frame(f"checkpoint {i}") for i in range(header["checkpoints"])]
        if not all(isinstance(n, bytes) for n in notes):
            raise ExportError("a checkpoint frame is not a note (bin)")
        entries = []
        for seq in range(header["entries"]):
            try:
                row = _entry_row(reader.frame(f"entry {seq}"), seq)
            except EntryError as exc:
                raise ExportError(f"entry {seq} cannot be read: {exc}") from exc
            entries.append(Entry.from_body(row.body, row.prev, row.hash))
    return ExportContents(header["merkle_hash"], header["origin"], notes, entries)

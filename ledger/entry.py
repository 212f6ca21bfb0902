"""Ledger entries: the body bytes, the chain hash, and the `Entry` value (pure, no I/O).

An entry's *body* is the canonical msgpack encoding of the 6-element array
`[seq, ts, kind, actor, subject, payload]`. Its *hash* chains it to the entry before:

    hash = BLAKE3(CHAIN_DOMAIN || prev || body)

where `prev` is the previous entry's hash (32 zero bytes for seq 0). Only these stored
bytes are hashed, so a verifier never has to decode a payload (see ledger/verify.py
and docs/PROTOCOL.md, "Ledger entries").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import blake3

from ledger.encoding import MAX_DOCUMENT_BYTES, EncodingError, canonical_decode, canonical_encode
from ledger.errors import EntryError

GENESIS_PREV = bytes(32)
CHAIN_DOMAIN = b"fleetledger/entry/v1\x00"
HASH_SIZE = 32
BODY_FIELDS = 6
# 0x90 | 6: the msgpack fixarray header of a 6-element array.
BODY_ARRAY_HEADER = b"\x96"

KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
MAX_NAME_CHARS = 256
# Both columns are signed 64-bit in SQL (SQLite INTEGER, PostgreSQL BIGINT).
MAX_INT64 = 2**63 - 1


def _check_int(name: str, value: object) -> None:
    # bool is an int subclass but msgpack writes it as true/false, not as a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise EntryError(f"{name} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_INT64:
        raise EntryError(f"{name} must be between 0 and 2**63-1, got {value}")


def _check_name(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise EntryError(f"{name} must be text, got {type(value).__name__}")
    if not value:
        raise EntryError(f"{name} must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise EntryError(f"{name} is {len(value)} characters; the limit is {MAX_NAME_CHARS}")


def _check_header(seq: object, ts: object, kind: object, actor: object, subject: object) -> None:
    _check_int("seq", seq)
    _check_int("ts (UTC nanoseconds)", ts)
    if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
        raise EntryError(
            f"kind {kind!r} is not a dotted lower-case name such as 'model.registered'"
        )
    _check_name("actor", actor)
    _check_name("subject", subject)


def _check_digest(name: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise EntryError(f"{name} must be {HASH_SIZE} bytes, got {value!r:.80}")


def header_prefix(seq: int, ts: int, kind: str, actor: str, subject: str) -> bytes:
    """The exact bytes an entry body with these indexed columns must start with.

    A msgpack array is its header followed by its elements' encodings, so the first
    five fields can be checked against the stored columns without touching the payload.
    """
    _check_header(seq, ts, kind, actor, subject)
    fields = (seq, ts, kind, actor, subject)
    return BODY_ARRAY_HEADER + b"".join(canonical_encode(v) for v in fields)


def encode_body(
    seq: int, ts: int, kind: str, actor: str, subject: str, payload: dict[str, Any]
) -> bytes:
    """The canonical body bytes of an entry; raises `EntryError` on invalid fields."""
    _check_header(seq, ts, kind, actor, subject)
    if not isinstance(payload, dict):
        raise EntryError(f"payload must be a map (dict), got {type(payload).__name__}")
    try:
        body = canonical_encode([seq, ts, kind, actor, subject, payload])
    except EncodingError as exc:
        raise EntryError(f"payload of {kind} for {subject} cannot be encoded: {exc}") from exc
    # Refuse what canonical_decode would refuse, so every appended entry can be read back.
    if len(body) > MAX_DOCUMENT_BYTES:
        raise EntryError(
            f"entry body is {len(body)} bytes; the limit is {MAX_DOCUMENT_BYTES} "
            "(store large data elsewhere and put its digest in the payload)"
        )
    return body


def chain_hash(prev: bytes, body: bytes) -> bytes:
    """BLAKE3(CHAIN_DOMAIN || prev || body): the 32-byte hash of an entry."""
    return blake3.blake3(CHAIN_DOMAIN + prev + body).digest()


@dataclass(frozen=True)
class Entry:
    """One ledger entry. Construction validates every field.

    `body` is fixed when the entry is made: treat `payload` as read-only, since
    changing it afterwards would not change the bytes that were hashed and stored.
    """

    seq: int
    ts: int
    kind: str
    actor: str
    subject: str
    payload: dict[str, Any] = field(hash=False)
    prev: bytes
    hash: bytes
    # Private: only `from_body` and `build_entry` pass it, with bytes they just encoded
    # or decoded, which saves re-encoding the payload. Empty means "compute it".
    _body: bytes = field(default=b"", repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_digest("prev", self.prev)
        _check_digest("hash", self.hash)
        if self._body:
            _check_header(self.seq, self.ts, self.kind, self.actor, self.subject)
            if not isinstance(self.payload, dict):
                raise EntryError(f"payload must be a map, got {type(self.payload).__name__}")
        else:
            body = encode_body(
                self.seq, self.ts, self.kind, self.actor, self.subject, self.payload
            )
            object.__setattr__(self, "_body", body)

    def __repr__(self) -> str:
        return (
            f"Entry(seq={self.seq}, ts={self.ts}, kind={self.kind!r}, actor={self.actor!r}, "
            f"subject={self.subject!r}, payload={self.payload!r}, prev={self.prev.hex()[:16]}…, "
            f"hash={self.hash.hex()[:16]}…)"
        )

    @property
    def body(self) -> bytes:
        """The canonical bytes that were hashed (and are stored)."""
        return self._body

    def hash_matches(self) -> bool:
        """True if `hash` really is the chain hash of `prev` and `body`."""
        return chain_hash(self.prev, self._body) == self.hash

    @classmethod
    def from_body(cls, body: bytes, prev: bytes, hash: bytes) -> Entry:
        """Read an entry from its stored bytes, strictly (non-canonical bytes are refused).

        The hash is not checked here; that is verification's job (`hash_matches`,
        ledger.verify), so that a damaged ledger can still be inspected.
        """
        try:
            value = canonical_decode(bytes(body))
        except EncodingError as exc:
            raise EntryError(f"entry body is not canonical msgpack: {exc}") from exc
        if not isinstance(value, list) or len(value) != BODY_FIELDS:
            raise EntryError(
                "entry body must be a 6-element array [seq, ts, kind, actor, subject, payload]"
            )
        seq, ts, kind, actor, subject, payload = value
        return cls(seq, ts, kind, actor, subject, payload, bytes(prev), bytes(hash), bytes(body))


def build_entry(
    seq: int,
    prev_hash: bytes,
    ts: int,
    kind: str,
    actor: str,
    subject: str,
    payload: dict[str, Any],
) -> Entry:
    """Make the entry at `seq` chained onto `prev_hash` (use `make_entry` when you hold
    the previous Entry; this form lets a store chain on a head it has not decoded)."""
    _check_digest("prev", prev_hash)
    body = encode_body(seq, ts, kind, actor, subject, payload)
    # Keep a private copy of the payload, exactly as any later reader will decode it
    # (tuples become lists, bytearrays bytes), not the caller's still-mutable dict.
    stored_payload: dict[str, Any] = canonical_decode(body)[5]
    return Entry(
        seq, ts, kind, actor, subject, stored_payload, prev_hash, chain_hash(prev_hash, body), body
    )


def make_entry(
    prev: Entry | None,
    ts: int,
    kind: str,
    actor: str,
    subject: str,
    payload: dict[str, Any],
) -> Entry:
    """Make the entry that follows `prev` (or the genesis entry, seq 0, if `prev` is None)."""
    if prev is None:
        return build_entry(0, GENESIS_PREV, ts, kind, actor, subject, payload)
    return build_entry(prev.seq + 1, prev.hash, ts, kind, actor, subject, payload)

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
from typing import Any

import blake3

from ledger.encoding import (
    MAX_DOCUMENT_BYTES,
    canonical_decode,
    canonical_encode,
    canonical_encode_record,
)
from ledger.errors import EncodingError, EntryError

GENESIS_PREV = bytes(32)
CHAIN_DOMAIN = b"fleetledger/entry/v1\x00"
# The chain hash by name, as the ledger meta table and the export header record it.
HASH_NAME = "blake3"
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


# Kinds already checked against KIND_PATTERN: a ledger uses a few dozen, and the regex
# is a measurable part of an append. Bounded, so odd input cannot grow it without end.
_GOOD_KINDS: set[str] = set()
_GOOD_KINDS_MAX = 4096


def _check_kind(kind: object) -> None:
    if type(kind) is str and kind in _GOOD_KINDS:
        return
    if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
        raise EntryError(
            f"kind {kind!r} is not a dotted lower-case name such as 'model.registered'"
        )
    if type(kind) is str and len(_GOOD_KINDS) < _GOOD_KINDS_MAX:
        _GOOD_KINDS.add(kind)


def _check_header(seq: object, ts: object, kind: object, actor: object, subject: object) -> None:
    # The common case in a few comparisons; anything unusual gets the precise message.
    if not (
        type(seq) is int
        and type(ts) is int
        and 0 <= seq <= MAX_INT64
        and 0 <= ts <= MAX_INT64
        and type(actor) is str
        and type(subject) is str
        and 0 < len(actor) <= MAX_NAME_CHARS
        and 0 < len(subject) <= MAX_NAME_CHARS
    ):
        _check_int("seq", seq)
        _check_int("ts (UTC nanoseconds)", ts)
        _check_kind(kind)
        _check_name("actor", actor)
        _check_name("subject", subject)
    else:
        _check_kind(kind)


def check_header(seq: object, ts: object, kind: object, actor: object, subject: object) -> None:
    """Raise `EntryError` if these indexed columns break the rules of docs/PROTOCOL.md
    (cheap: nothing is encoded)."""
    _check_header(seq, ts, kind, actor, subject)


def _check_digest(name: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise EntryError(f"{name} must be {HASH_SIZE} bytes, got {value!r:.80}")


def header_prefix(seq: int, ts: int, kind: str, actor: str, subject: str) -> bytes:
    """The exact bytes an entry body with these indexed columns must start with.

    A msgpack array is its header followed by its elements' encodings, so the first
    five fields can be checked against the stored columns without touching the payload.
    """
    _check_header(seq, ts, kind, actor, subject)
    # The 5-element array's encoding is its 1-byte header (0x95) and then the fields.
    return BODY_ARRAY_HEADER + canonical_encode((seq, ts, kind, actor, subject))[1:]


def encode_body(
    seq: int, ts: int, kind: str, actor: str, subject: str, payload: dict[str, Any]
) -> bytes:
    """The canonical body bytes of an entry; raises `EntryError` on invalid fields."""
    _check_header(seq, ts, kind, actor, subject)
    if not isinstance(payload, dict):
        raise EntryError(f"payload must be a map (dict), got {type(payload).__name__}")
    try:
        body = canonical_encode_record((seq, ts, kind, actor, subject), payload)
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


class Entry:
    """One ledger entry (immutable). Construction validates every field.

    `Entry(seq, ts, kind, actor, subject, payload, prev, hash)` encodes the body from
    the fields. The body is fixed when the entry is made; `payload` is the body's
    payload as any reader decodes it (tuples become lists, bytearrays bytes), decoded
    on first use: entries made by an append that nobody reads the payload of never pay
    for it. Treat the returned dict as read-only.

    Two entries are equal when their fields and bodies are (the body is the payload's
    one canonical encoding); the hash of an entry leaves the payload out.
    """

    __slots__ = ("_body", "_payload", "actor", "hash", "kind", "prev", "seq", "subject", "ts")

    seq: int
    ts: int
    kind: str
    actor: str
    subject: str
    prev: bytes
    hash: bytes
    _body: bytes
    _payload: dict[str, Any] | None

    def __init__(
        self,
        seq: int,
        ts: int,
        kind: str,
        actor: str,
        subject: str,
        payload: dict[str, Any],
        prev: bytes,
        hash: bytes,
        _body: bytes = b"",
    ) -> None:
        # `_body` is private: `from_body` passes the bytes it just decoded `payload` from.
        _check_digest("prev", prev)
        _check_digest("hash", hash)
        if _body:
            _check_header(seq, ts, kind, actor, subject)
            if not isinstance(payload, dict):
                raise EntryError(f"payload must be a map, got {type(payload).__name__}")
            stored: dict[str, Any] | None = payload
        else:
            _body = encode_body(seq, ts, kind, actor, subject, payload)
            stored = None  # decoded from the body when asked for: the caller's dict may change
        _set = object.__setattr__
        for name, value in (
            ("seq", seq), ("ts", ts), ("kind", kind), ("actor", actor), ("subject", subject),
            ("prev", prev), ("hash", hash), ("_body", _body), ("_payload", stored),
        ):  # fmt: skip
            _set(self, name, value)

    @classmethod
    def _trusted(
        cls, seq: int, ts: int, kind: str, actor: str, subject: str, body: bytes, prev: bytes,
        hash: bytes,
    ) -> Entry:  # fmt: skip
        """An entry from fields the caller has just validated and encoded (`body`) and
        hashed: what an append makes, at a fraction of the cost of `Entry(...)`."""
        entry = object.__new__(cls)
        _set = object.__setattr__
        _set(entry, "seq", seq)
        _set(entry, "ts", ts)
        _set(entry, "kind", kind)
        _set(entry, "actor", actor)
        _set(entry, "subject", subject)
        _set(entry, "prev", prev)
        _set(entry, "hash", hash)
        _set(entry, "_body", body)
        _set(entry, "_payload", None)
        return entry

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Entry is immutable; cannot assign to {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Entry is immutable; cannot delete {name!r}")

    def _key(self) -> tuple[int, int, str, str, str, bytes, bytes]:
        return (self.seq, self.ts, self.kind, self.actor, self.subject, self.prev, self.hash)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self._key() == other._key() and self._body == other._body

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Entry._trusted, (self.seq, self.ts, self.kind, self.actor, self.subject,
                                 self._body, self.prev, self.hash))  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Entry(seq={self.seq}, ts={self.ts}, kind={self.kind!r}, actor={self.actor!r}, "
            f"subject={self.subject!r}, payload={self.payload!r}, prev={self.prev.hex()[:16]}…, "
            f"hash={self.hash.hex()[:16]}…)"
        )

    @property
    def payload(self) -> dict[str, Any]:
        """The payload map, decoded from the body (once, then kept)."""
        payload = self._payload
        if payload is None:
            payload = canonical_decode(self._body)[5]
            object.__setattr__(self, "_payload", payload)
        return payload

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
    # The payload is not copied here: `Entry.payload` decodes it from the body when
    # asked, exactly as any later reader will see it, not the caller's mutable dict.
    return Entry._trusted(seq, ts, kind, actor, subject, body, prev_hash,
                          chain_hash(prev_hash, body))  # fmt: skip


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

"""C2SP signed notes with Ed25519 keys, and Ed25519 witness cosignatures (pure, no I/O).

A signed note (c2sp.org/signed-note) is UTF-8 text ending in a newline, a blank line,
then one or more signature lines::

    <text>\\n
    \\n
    \\u2014 <key name> base64(4-byte key hash || signature)\\n

* Ed25519 note signatures (type 0x01) are raw RFC 8032 signatures over the text bytes.
* Ed25519 cosignatures (type 0x04, c2sp.org/tlog-cosignature) are the 8-byte big-endian
  POSIX timestamp followed by an Ed25519 signature over
  ``"cosignature/v1\\ntime <timestamp>\\n" || text``.
* Key hash = first 4 bytes (big-endian uint32) of SHA-256(name || 0x0A || type || pubkey).

These signatures are exactly what the C2SP specs define, so standard transparency-log
tools can check them; unlike `ledger.signing` they carry no "fleetledger/" prefix
(the note formats are domain-separated by their own rules). The keys can be the same
Ed25519 seeds `ledger.signing.SigningKey` stores.

The reference implementation this mirrors is Go's golang.org/x/mod/sumdb/note
(verifier keys "<name>+<hash>+<base64(type || pubkey)>", signer keys
"PRIVATE+KEY+<name>+<hash>+<base64(type || seed)>"). Deliberate differences, all of
them stricter: base64 must be canonical (padding bits zero), key hashes in key strings
must be lowercase hex, and every signature from a known key is verified, including
repeats.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ledger.errors import NoteError, UnverifiedNoteError
from ledger.signing import SigningKey

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04

# The spec asks verifiers to accept at least 16 signatures; Go's reference accepts 100.
MAX_SIGNATURES = 100
# 16 post-quantum signature lines (~7 KB each) fit; nothing legitimate comes close.
MAX_NOTE_BYTES = 256 * 1024
MAX_TIMESTAMP = 2**63 - 1

SIGNATURE_PREFIX = "\u2014 "  # em dash (U+2014), space
COSIGNATURE_HEADER = "cosignature/v1\n"
KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
TIMESTAMP_SIZE = 8
PRIVATE_KEY_PREFIX = "PRIVATE+KEY+"

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_KEY_HASH_HEX = re.compile(r"[0-9a-f]{8}")


def valid_key_name(name: object) -> bool:
    """A key name is non-empty text with no Unicode spaces and no plus (U+002B)."""
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(ch.isspace() for ch in name)
        and _CONTROL.search(name) is None
    )


def _check_key_name(name: object) -> str:
    if not valid_key_name(name):
        raise NoteError(
            f"key name {name!r} is invalid: it must be non-empty, with no spaces, "
            "no '+' and no control characters"
        )
    assert isinstance(name, str)
    return name


def key_hash(name: str, alg: int, public_key: bytes) -> int:
    """SHA-256(name || "\\n" || alg || public_key)[:4] as a big-endian uint32."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([alg]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: str, what: str) -> bytes:
    """Standard base64 (RFC 4648 section 4) with padding, in its one canonical form."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise NoteError(f"{what} is not valid base64: {text[:60]!r}") from exc
    if b64encode(raw) != text:
        raise NoteError(f"{what} is not canonical base64 (non-zero padding bits): {text[:60]!r}")
    return raw


def _public_raw(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _check_timestamp(timestamp: object) -> int:
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise NoteError(f"timestamp must be an integer, got {type(timestamp).__name__}")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise NoteError(f"timestamp must be between 0 and 2**63-1, got {timestamp}")
    return timestamp


def cosignature_message(text: bytes, timestamp: int) -> bytes:
    """What an Ed25519 cosignature (type 0x04) signs: header, time line, checkpoint body."""
    _check_timestamp(timestamp)
    return f"{COSIGNATURE_HEADER}time {timestamp}\n".encode("ascii") + text


# -- signatures and notes ------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One signature line: key name, key hash, and the signature bytes after the hash."""

    name: str
    key_hash: int
    signature: bytes

    @property
    def key_id(self) -> str:
        """The key as "<name>+<8 hex digits>", as in Go's error messages and vkeys."""
        return f"{self.name}+{self.key_hash:08x}"

    def line(self) -> str:
        """The signature line, without its final newline."""
        raw = self.key_hash.to_bytes(4, "big") + self.signature
        return f"{SIGNATURE_PREFIX}{self.name} {b64encode(raw)}"


@dataclass(frozen=True)
class Note:
    """An opened note: its text, the signatures that verified, and those from unknown keys."""

    text: str
    sigs: tuple[Signature, ...]
    unverified_sigs: tuple[Signature, ...] = ()


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise NoteError(f"note text must be str, got {type(text).__name__}")
    if not text.endswith("\n"):
        raise NoteError("note text must end in a newline")
    bad = _CONTROL.search(text)
    if bad is not None:
        raise NoteError(
            f"note text contains control character U+{ord(bad.group()):04X} "
            f"at offset {bad.start()}; only newline is allowed (no CR, no tab)"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NoteError(f"note text is not encodable as UTF-8: {exc}") from exc
    return text


def _parse_signature_line(line: str, number: int) -> Signature:
    if not line.startswith(SIGNATURE_PREFIX):
        raise NoteError(
            f"signature line {number} does not start with an em dash (U+2014) and a space: "
            f"{line[:60]!r}"
        )
    name, sep, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
    if not sep or not encoded:
        raise NoteError(f"signature line {number} has no signature after the key name")
    if not valid_key_name(name):
        raise NoteError(f"signature line {number} has an invalid key name {name!r}")
    raw = b64decode_strict(encoded, f"signature line {number}")
    if len(raw) < 5:
        raise NoteError(f"signature line {number} is too short: {len(raw)} bytes")
    return Signature(name, int.from_bytes(raw[:4], "big"), raw[4:])


def parse_note(
    data: bytes,
    *,
    max_bytes: int = MAX_NOTE_BYTES,
    max_signatures: int = MAX_SIGNATURES,
) -> tuple[str, tuple[Signature, ...]]:
    """Split a signed note into its text and signature lines, checking syntax only.

    Nothing is verified here: use `open_note` for that.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise NoteError(f"a signed note must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise NoteError(f"note is {len(data)} bytes; the limit is {max_bytes}")
    try:
        whole = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError(f"note is not valid UTF-8 (byte offset {exc.start})") from exc
    bad = _CONTROL.search(whole)
    if bad is not None:
        raise NoteError(
            f"note contains control character U+{ord(bad.group()):04X} at offset "
            f"{bad.start()}; only newline is allowed (no CR, no tab)"
        )
    split = whole.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line between the text and the signatures")
    text, block = whole[: split + 1], whole[split + 2 :]
    if not block:
        raise NoteError("note has no signature lines after the blank line")
    if not block.endswith("\n"):
        raise NoteError("the last signature line does not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > max_signatures:
        raise NoteError(f"note has {len(lines)} signatures; the limit is {max_signatures}")
    sigs = tuple(_parse_signature_line(line, i + 1) for i, line in enumerate(lines))
    return text, sigs


def format_note(text: str, sigs: Sequence[Signature]) -> bytes:
    """Text, blank line, signature lines; checked to parse back to the same thing."""
    _check_text(text)
    if not sigs:
        raise NoteError("a signed note needs at least one signature")
    for sig in sigs:
        _check_key_name(sig.name)
        if not 0 <= sig.key_hash < 2**32:
            raise NoteError(f"key hash {sig.key_hash} does not fit in 32 bits")
    data = (text + "\n" + "".join(sig.line() + "\n" for sig in sigs)).encode("utf-8")
    if parse_note(data) != (text, tuple(sigs)):
        raise NoteError("note does not parse back to its text and signatures")  # pragma: no cover
    return data


def add_signatures(data: bytes, sigs: Sequence[Signature]) -> bytes:
    """Append signature lines to a note. An existing line from the same key (name and key
    hash) is dropped, as in Go's note.Sign. Nothing is verified here."""
    text, existing = parse_note(data)
    new_keys = {(s.name, s.key_hash) for s in sigs}
    kept = [s for s in existing if (s.name, s.key_hash) not in new_keys]
    return format_note(text, [*kept, *sigs])


# -- keys ------------------------------------------------------------------------------


class NoteVerifier(Protocol):
    """Anything that checks note signatures of one key (name + key hash)."""

    @property
    def name(self) -> str: ...

    @property
    def key_hash(self) -> int: ...

    def verify(self, text: bytes, signature: bytes) -> bool: ...


def _check_public_key(public_key: object) -> bytes:
    if not isinstance(public_key, bytes) or len(public_key) != KEY_SIZE:
        raise NoteError(f"an Ed25519 public key is {KEY_SIZE} bytes, got {public_key!r:.80}")
    return public_key


def _load_public(public_key: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:  # pragma: no cover - every 32-byte string loads
        raise NoteError(f"not an Ed25519 public key: {exc}") from exc


def _vkey(name: str, alg: int, public_key: bytes) -> str:
    return f"{name}+{key_hash(name, alg, public_key):08x}+{b64encode(bytes([alg]) + public_key)}"


@dataclass(frozen=True)
class Verifier:
    """Checks Ed25519 note signatures (type 0x01) by one named key."""

    name: str
    public_key: bytes
    key_hash: int = field(init=False)
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        _check_public_key(self.public_key)
        object.__setattr__(self, "key_hash", key_hash(self.name, ALG_ED25519, self.public_key))
        object.__setattr__(self, "_key", _load_public(self.public_key))

    def verify(self, text: bytes, signature: bytes) -> bool:
        if len(signature) != ED25519_SIGNATURE_SIZE:
            return False
        try:
            self._key.verify(signature, text)
        except InvalidSignature:
            return False
        return True

    def vkey(self) -> str:
        """The verifier key string "<name>+<hash>+<base64(0x01 || pubkey)>"."""
        return _vkey(self.name, ALG_ED25519, self.public_key)


@dataclass(frozen=True)
class CosignatureVerifier:
    """Checks Ed25519 witness cosignatures (type 0x04, cosignature/v1) by one named key."""

    name: str
    public_key: bytes
    key_hash: int = field(init=False)
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        _check_public_key(self.public_key)
        object.__setattr__(
            self, "key_hash", key_hash(self.name, ALG_COSIGNATURE_V1, self.public_key)
        )
        object.__setattr__(self, "_key", _load_public(self.public_key))

    def verify(self, text: bytes, signature: bytes) -> bool:
        """`signature` is the 8-byte big-endian timestamp followed by the Ed25519 signature."""
        if len(signature) != TIMESTAMP_SIZE + ED25519_SIGNATURE_SIZE:
            return False
        timestamp = int.from_bytes(signature[:TIMESTAMP_SIZE], "big")
        if timestamp > MAX_TIMESTAMP:
            return False
        try:
            self._key.verify(signature[TIMESTAMP_SIZE:], cosignature_message(text, timestamp))
        except InvalidSignature:
            return False
        return True

    def vkey(self) -> str:
        """The verifier key string "<name>+<hash>+<base64(0x04 || pubkey)>"."""
        return _vkey(self.name, ALG_COSIGNATURE_V1, self.public_key)


def cosignature_timestamp(sig: Signature) -> int:
    """The POSIX timestamp (seconds) inside an Ed25519 cosignature."""
    if len(sig.signature) != TIMESTAMP_SIZE + ED25519_SIGNATURE_SIZE:
        raise NoteError(f"signature by {sig.key_id} is not an Ed25519 cosignature (wrong size)")
    return int.from_bytes(sig.signature[:TIMESTAMP_SIZE], "big")


def parse_vkey(vkey: str) -> Verifier | CosignatureVerifier:
    """Read a verifier key "<name>+<hash>+<base64(type || pubkey)>" (type 0x01 or 0x04)."""
    if not isinstance(vkey, str):
        raise NoteError(f"a verifier key is text, got {type(vkey).__name__}")
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise NoteError("a verifier key has the form <name>+<hash>+<key>")
    name, hash_hex, encoded = parts
    _check_key_name(name)
    if not _KEY_HASH_HEX.fullmatch(hash_hex):
        raise NoteError(f"verifier key hash {hash_hex!r} is not 8 lowercase hex digits")
    raw = b64decode_strict(encoded, "verifier key")
    if not raw:
        raise NoteError("verifier key has no key data")
    alg, public_key = raw[0], raw[1:]
    verifier: Verifier | CosignatureVerifier
    if alg not in (ALG_ED25519, ALG_COSIGNATURE_V1):
        raise NoteError(
            f"verifier key type 0x{alg:02x} is not supported "
            "(0x01 Ed25519 and 0x04 Ed25519 cosignature are)"
        )
    if len(public_key) != KEY_SIZE:
        raise NoteError(f"verifier key holds {len(public_key)} key bytes, not {KEY_SIZE}")
    if alg == ALG_ED25519:
        verifier = Verifier(name, public_key)
    else:
        verifier = CosignatureVerifier(name, public_key)
    if f"{verifier.key_hash:08x}" != hash_hex:
        raise NoteError(f"verifier key hash {hash_hex} does not match its name and key")
    return verifier


@dataclass(frozen=True)
class Signer:
    """Makes Ed25519 note signatures (type 0x01) with one named key."""

    name: str
    private: Ed25519PrivateKey = field(repr=False, compare=False)
    public_key: bytes = field(init=False)
    key_hash: int = field(init=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        if not isinstance(self.private, Ed25519PrivateKey):
            raise NoteError(f"a signer needs an Ed25519 private key, got {self.private!r:.80}")
        public = _public_raw(self.private)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "key_hash", key_hash(self.name, ALG_ED25519, public))

    @classmethod
    def from_signing_key(cls, name: str, key: SigningKey) -> Signer:
        return cls(name, key.private)

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Signer:
        if len(seed) != KEY_SIZE:
            raise NoteError(f"an Ed25519 seed is {KEY_SIZE} bytes, got {len(seed)}")
        return cls(name, Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def generate(cls, name: str) -> Signer:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> Signer:
        """Read Go's signer key "PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>"."""
        if not isinstance(skey, str) or not skey.startswith(PRIVATE_KEY_PREFIX):
            raise NoteError("a signer key starts with 'PRIVATE+KEY+'")
        parts = skey[len(PRIVATE_KEY_PREFIX) :].split("+", 2)
        if len(parts) != 3:
            raise NoteError("a signer key has the form PRIVATE+KEY+<name>+<hash>+<key>")
        name, hash_hex, encoded = parts
        _check_key_name(name)
        if not _KEY_HASH_HEX.fullmatch(hash_hex):
            raise NoteError(f"signer key hash {hash_hex!r} is not 8 lowercase hex digits")
        raw = b64decode_strict(encoded, "signer key")
        if len(raw) != 1 + KEY_SIZE or raw[0] != ALG_ED25519:
            raise NoteError("signer key data must be 0x01 followed by a 32-byte Ed25519 seed")
        signer = cls.from_seed(name, raw[1:])
        if f"{signer.key_hash:08x}" != hash_hex:
            raise NoteError(f"signer key hash {hash_hex} does not match its name and key")
        return signer

    def seed(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def skey(self) -> str:
        """Go's signer key string; it holds the private key, so keep it secret."""
        encoded = b64encode(bytes([ALG_ED25519]) + self.seed())
        return f"{PRIVATE_KEY_PREFIX}{self.name}+{self.key_hash:08x}+{encoded}"

    def verifier(self) -> Verifier:
        return Verifier(self.name, self.public_key)

    def vkey(self) -> str:
        return self.verifier().vkey()

    def sign(self, text: bytes) -> bytes:
        return self.private.sign(text)


@dataclass(frozen=True)
class CosignatureSigner:
    """Makes Ed25519 witness cosignatures (type 0x04, cosignature/v1) with one named key."""

    name: str
    private: Ed25519PrivateKey = field(repr=False, compare=False)
    public_key: bytes = field(init=False)
    key_hash: int = field(init=False)

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        if not isinstance(self.private, Ed25519PrivateKey):
            raise NoteError(f"a cosigner needs an Ed25519 private key, got {self.private!r:.80}")
        public = _public_raw(self.private)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "key_hash", key_hash(self.name, ALG_COSIGNATURE_V1, public))

    @classmethod
    def from_signing_key(cls, name: str, key: SigningKey) -> CosignatureSigner:
        return cls(name, key.private)

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.public_key)

    def vkey(self) -> str:
        return self.verifier().vkey()

    def sign(self, text: bytes, timestamp: int) -> bytes:
        """8-byte big-endian timestamp || Ed25519 signature of the cosignature message."""
        message = cosignature_message(text, timestamp)
        return timestamp.to_bytes(TIMESTAMP_SIZE, "big") + self.private.sign(message)

    def signature(self, text: str, timestamp: int) -> Signature:
        """The cosignature of a note text as a signature line value."""
        _check_text(text)
        return Signature(self.name, self.key_hash, self.sign(text.encode("utf-8"), timestamp))


# -- signing and opening -----------------------------------------------------------------


def sign_note(text: str, signers: Sequence[Signer]) -> bytes:
    """A signed note: `text` (which must end in a newline) signed by each signer in order."""
    _check_text(text)
    if not signers:
        raise NoteError("sign_note needs at least one signer")
    raw = text.encode("utf-8")
    return format_note(text, [Signature(s.name, s.key_hash, s.sign(raw)) for s in signers])


def open_note(
    data: bytes,
    verifiers: Iterable[NoteVerifier],
    *,
    max_bytes: int = MAX_NOTE_BYTES,
    max_signatures: int = MAX_SIGNATURES,
) -> Note:
    """Parse a signed note and verify every signature from a known key.

    Signatures from unknown keys (name and key hash not both matching a verifier) are
    kept, unverified, in `Note.unverified_sigs` (repeats dropped). A signature from a
    known key that does not verify is an error (`NoteError`), and so is a note with no
    verified signature at all (`UnverifiedNoteError`, which carries the parsed note).
    """
    known: dict[tuple[str, int], NoteVerifier] = {}
    for verifier in verifiers:
        key = (verifier.name, verifier.key_hash)
        if key in known and known[key] != verifier:
            raise NoteError(f"two different verifiers claim the key {key[0]}+{key[1]:08x}")
        known[key] = verifier
    text, sigs = parse_note(data, max_bytes=max_bytes, max_signatures=max_signatures)
    raw = text.encode("utf-8")
    verified: list[Signature] = []
    unverified: list[Signature] = []
    verified_keys: set[tuple[str, int]] = set()
    for sig in sigs:
        key = (sig.name, sig.key_hash)
        found = known.get(key)
        if found is None:
            if sig not in unverified:
                unverified.append(sig)
            continue
        if not found.verify(raw, sig.signature):
            raise NoteError(
                f"signature by known key {sig.key_id} does not verify: the text was "
                "changed, or the signature is corrupt or forged"
            )
        if key not in verified_keys:
            verified_keys.add(key)
            verified.append(sig)
    note = Note(text, tuple(verified), tuple(unverified))
    if not verified:
        names = ", ".join(s.key_id for s in unverified)
        raise UnverifiedNoteError(
            f"note has no signature from a known key (it is signed by: {names})", note
        )
    return note

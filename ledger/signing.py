"""Ed25519 keys and domain-separated signatures.

Every signature covers `b"fleetledger/" + domain + b"\\x00" + message`, so a signature
made for one purpose (say a release manifest) can never be replayed as another (an
assignment or a checkpoint). Key id = first 16 bytes of BLAKE3(raw public key), hex.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ledger.errors import KeyFileError


def key_id(public_raw: bytes) -> str:
    return blake3.blake3(b"fleetledger/keyid\x00" + public_raw).digest()[:16].hex()


def signing_input(domain: str, message: bytes) -> bytes:
    return b"fleetledger/" + domain.encode("ascii") + b"\x00" + message


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @property
    def keyid(self) -> str:
        return key_id(self.raw)

    def verify(self, domain: str, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(
                signature, signing_input(domain, message)
            )
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, domain: str, message: bytes) -> bytes:
        return self.private.sign(signing_input(domain, message))

    def private_raw(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def save(self, path: Path) -> None:
        """Write the raw 32-byte seed as hex, readable by the owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.private_raw().hex() + "\n")

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            seed = bytes.fromhex(path.read_text().strip())
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        except FileNotFoundError as exc:
            raise KeyFileError(f"key file {path} does not exist") from exc
        except ValueError as exc:
            raise KeyFileError(f"key file {path} does not hold an Ed25519 seed in hex") from exc

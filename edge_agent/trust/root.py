"""The device's pinned root of trust and signature checks against it (pure).

A trust root (TUF-style) lists Ed25519 public keys and, per role, which keys count
and how many of them must sign (the threshold). It is itself signed by a threshold
of its `root` role. The agent loads it from a file given at enrolment and checks
every manifest and assignment against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ProtocolError, TrustError
from edge_agent.protocol.documents import DOMAIN_ROOT, SignedEnvelope
from ledger.signing import PublicKey, SigningKey

__all__ = ["ROLES", "Role", "TrustError", "TrustRoot"]

ROLES = ("root", "release", "director", "log", "timestamp")


@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class TrustRoot:
    version: int
    expires: int  # ns
    keys: dict[str, PublicKey]
    roles: dict[str, Role]
    envelope: SignedEnvelope
    # keyid -> C2SP note key name (optional `name` of a key): the log origin for `log`
    # keys, the witness name for `witness` keys (edge_agent/trust/inclusion.py).
    names: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------ building

    @staticmethod
    def build(
        role_keys: dict[str, list[SigningKey]],
        thresholds: dict[str, int] | None = None,
        version: int = 1,
        expires: int | None = None,
        names: dict[str, str] | None = None,
    ) -> SignedEnvelope:
        """Make a root document for `role_keys` and sign it with the root role's keys.
        `names` (keyid -> note key name) names log and witness keys."""
        thresholds = thresholds or {}
        names = names or {}
        keys: dict[str, Any] = {}
        roles: dict[str, Any] = {}
        for role, signers in role_keys.items():
            for key in signers:
                keys[key.keyid] = {"keytype": "ed25519", "public": key.public.raw}
                if key.keyid in names:
                    keys[key.keyid]["name"] = names[key.keyid]
            roles[role] = {
                "keyids": [k.keyid for k in signers],
                "threshold": thresholds.get(role, 1),
            }
        if expires is None:
            expires = time.time_ns() + 365 * 24 * 3600 * 10**9
        doc = {"type": "root", "version": version, "expires": expires, "keys": keys,
               "roles": roles}
        return SignedEnvelope.sign(doc, DOMAIN_ROOT, role_keys["root"])

    # ------------------------------------------------------------ loading

    @classmethod
    def from_envelope(
        cls, envelope: SignedEnvelope, now: int | None = None, allow_expired: bool = False
    ) -> TrustRoot:
        """Parse a root that vouches for itself (a threshold of its own root keys).

        `allow_expired` is for intermediate roots of a rotation chain (and a stored root
        that expired while the device was off): the chain walk judges the final one.
        """
        root = cls.parse_unverified(envelope)
        # A root vouches for itself: it must meet its own root threshold.
        root.check_signatures(envelope, "root", DOMAIN_ROOT)
        if not allow_expired and root.expired(now):
            raise TrustError("trust root has expired; fetch a newer root from the hub")
        return root

    @classmethod
    def parse_unverified(cls, envelope: SignedEnvelope) -> TrustRoot:
        """The root's fields, checked for form but not for signatures: only to show a
        root that is still being signed (`hub keys root sign`), never to trust one."""
        try:
            doc = envelope.document("trust root")
        except ProtocolError as exc:
            raise TrustError(str(exc)) from exc
        if doc.get("type") != "root":
            raise TrustError(f"trust root: expected type 'root', got {doc.get('type')!r}")
        try:
            keys = {
                keyid: PublicKey(_as(spec, dict)["public"])
                for keyid, spec in _as(doc.get("keys"), dict).items()
            }
            roles = {
                name: Role(
                    tuple(_as(_as(spec, dict)["keyids"], list)),
                    int(_as(spec["threshold"], int)),
                )
                for name, spec in _as(doc.get("roles"), dict).items()
            }
            names = {
                keyid: _as(spec["name"], str)
                for keyid, spec in _as(doc.get("keys"), dict).items()
                if "name" in _as(spec, dict)
            }
            version = _as(doc.get("version"), int)
            expires = _as(doc.get("expires"), int)
        except (KeyError, TypeError) as exc:
            raise TrustError(f"trust root is malformed: {exc}") from exc
        for keyid, key in keys.items():
            if not isinstance(key.raw, bytes) or len(key.raw) != 32 or key.keyid != keyid:
                raise TrustError(f"trust root: key {keyid} does not match its public key")
        for name, role in roles.items():
            if role.threshold < 1:
                raise TrustError(f"trust root: role {name} has threshold below 1")
        if not 1 <= version <= 2**63 - 1:
            raise TrustError(f"trust root: version {version} is not a positive integer")
        return cls(version, expires, keys, roles, envelope, names)

    @classmethod
    def load(cls, path: Path) -> TrustRoot:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TrustError(f"cannot read trust root {path}: {exc.strerror}") from exc
        try:
            return cls.from_envelope(SignedEnvelope.decode(data, "trust root"))
        except ProtocolError as exc:
            raise TrustError(str(exc)) from exc

    # ------------------------------------------------------------ checking

    def expired(self, now: int | None = None) -> bool:
        return (now if now is not None else time.time_ns()) > self.expires

    def verify(
        self, envelope: SignedEnvelope, role: str, domain: str, now: int | None = None
    ) -> dict[str, Any]:
        """Return the signed document if a threshold of `role`'s keys signed it."""
        self.check_signatures(envelope, role, domain)
        try:
            doc = envelope.document(domain)
        except ProtocolError as exc:
            raise TrustError(str(exc)) from exc
        expires = doc.get("expires")
        if isinstance(expires, int) and (now if now is not None else time.time_ns()) > expires:
            raise TrustError(f"{domain} expired; the hub must re-sign it")
        return doc

    def check_signatures(self, envelope: SignedEnvelope, role: str, domain: str) -> None:
        """Raise TrustError unless a threshold of `role`'s keys signed `envelope`."""
        spec = self.roles.get(role)
        if spec is None:
            raise TrustError(f"trust root has no role {role!r}")
        valid: set[str] = set()
        for sig in envelope.signatures:
            if sig.keyid not in spec.keyids or sig.keyid in valid:
                continue
            key = self.keys.get(sig.keyid)
            if key is not None and key.verify(domain, envelope.signed, sig.sig):
                valid.add(sig.keyid)
        if len(valid) < spec.threshold:
            signers = ", ".join(s.keyid for s in envelope.signatures) or "none"
            raise TrustError(
                f"{domain}: {len(valid)} valid signature(s) from the {role} role, "
                f"{spec.threshold} required (signed by: {signers})"
            )

    def role_signers(self, role: str, keys: list[SigningKey]) -> list[SigningKey]:
        """Those of `keys` that the `role` of this root lists (the ones worth signing with)."""
        spec = self.roles.get(role)
        listed = set(spec.keyids) if spec is not None else set()
        return [k for k in keys if k.keyid in listed]


def _as(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value

"""Trust-root rotation: build the next root, and walk a chain of roots (pure, no I/O).

Roots are numbered. Root N+1 is accepted by a device that trusts root N only if

1. its version is exactly N + 1 (no skipping, no going back);
2. a threshold of root N's `root` role keys signed it (the old keys vouch for it);
3. a threshold of its own `root` role keys signed it (the new keys agree to it).

Intermediate roots may have expired (a device that was off for two years still walks
through them); the last root of the walk must not have expired. The I/O (reading
`root.<N>` from the KV bucket `roots`) is the caller's: it hands the walk the bytes it
fetched, by version. See docs/PROTOCOL.md ("Root rotation").
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from edge_agent.errors import ProtocolError, TrustError
from edge_agent.protocol.documents import DOMAIN_ROOT, SignedEnvelope
from edge_agent.trust.root import TrustRoot
from ledger.signing import PublicKey, SigningKey

MAX_CHAIN_STEPS = 1024  # a device walks at most this many roots in one go


class RootRotationError(TrustError):
    """A newer root was refused. `accepted` is the newest root that did verify."""

    def __init__(self, message: str, accepted: TrustRoot) -> None:
        super().__init__(message)
        self.accepted = accepted


def root_document(
    role_keys: Mapping[str, Sequence[PublicKey]],
    thresholds: Mapping[str, int],
    version: int,
    expires: int,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The unsigned root document for these public keys per role; `names` (keyid ->
    C2SP note key name) is kept in the key's optional `name` field."""
    names = names or {}
    keys: dict[str, Any] = {}
    roles: dict[str, Any] = {}
    for role, publics in role_keys.items():
        for public in publics:
            keys[public.keyid] = {"keytype": "ed25519", "public": public.raw}
            if public.keyid in names:
                keys[public.keyid]["name"] = names[public.keyid]
        roles[role] = {"keyids": [p.keyid for p in publics],
                       "threshold": int(thresholds.get(role, 1))}
    return {"type": "root", "version": version, "expires": expires, "keys": keys,
            "roles": roles}


def sign_root(document: Mapping[str, Any], signers: Sequence[SigningKey]) -> SignedEnvelope:
    """Sign a root document; each distinct key signs once."""
    unique = list({k.keyid: k for k in signers}.values())
    return SignedEnvelope.sign(document, DOMAIN_ROOT, unique)


def peek_version(data: bytes) -> int:
    """The version a root claims, unverified: only to decide what to fetch next."""
    try:
        doc = SignedEnvelope.decode(data, "trust root").document("trust root")
    except ProtocolError as exc:
        raise TrustError(str(exc)) from exc
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TrustError("trust root: missing or invalid version")
    return version


def verify_next_root(trusted: TrustRoot, data: bytes, now: int | None = None) -> TrustRoot:
    """Root `trusted.version + 1` from its bytes, if both key sets vouch for it.

    Expiry is not judged here (see `walk_chain`).
    """
    expected = trusted.version + 1
    try:
        envelope = SignedEnvelope.decode(data, "trust root")
    except ProtocolError as exc:
        raise TrustError(f"root {expected}: {exc}") from exc
    claimed = peek_version(data)
    if claimed <= trusted.version:
        raise TrustError(
            f"root version {claimed} is not newer than the trusted version {trusted.version}: "
            "rollback to an older root refused"
        )
    if claimed != expected:
        raise TrustError(
            f"root version {claimed} does not follow the trusted version {trusted.version} "
            f"(versions must increase by exactly 1; expected {expected})"
        )
    old_error = new_error = ""
    try:
        trusted.check_signatures(envelope, "root", DOMAIN_ROOT)
    except TrustError as exc:
        old_error = str(exc)
    try:
        new = TrustRoot.from_envelope(envelope, now=now, allow_expired=True)
    except TrustError as exc:
        if "valid signature" not in str(exc):
            raise TrustError(f"root {expected}: {exc}") from exc
        new_error = str(exc)
    if old_error and new_error:
        raise TrustError(f"root {expected} is signed by neither the old nor its own root keys: "
                         f"{old_error}")
    if new_error:
        raise TrustError(
            f"root rotation signed by the old keys only: root {expected} lacks a threshold "
            f"of its own root keys ({new_error})"
        )
    if old_error:
        raise TrustError(
            f"root rotation signed by the new keys only: root {expected} lacks a threshold "
            f"of root {trusted.version}'s root keys ({old_error})"
        )
    return new


def walk_chain(
    trusted: TrustRoot, newer: Mapping[int, bytes], now: int | None = None
) -> TrustRoot:
    """Walk from `trusted` through `newer[trusted.version + 1]`, `+ 2`, ... while present.

    Returns the newest root reached, which must not have expired. On a refusal raises
    RootRotationError naming the step, with `accepted` = the newest root that verified
    and has not expired (possibly `trusted` itself), so the caller can keep that progress.
    """
    now = now if now is not None else time.time_ns()
    current = trusted
    last_valid = trusted
    for _ in range(MAX_CHAIN_STEPS):
        data = newer.get(current.version + 1)
        if data is None:
            break
        try:
            current = verify_next_root(current, data, now)
        except TrustError as exc:
            raise RootRotationError(str(exc), last_valid) from exc
        if not current.expired(now):
            last_valid = current
    if current.expired(now):
        raise RootRotationError(
            f"the newest trust root (version {current.version}) has expired; "
            "the hub must publish a newer root", last_valid)
    return current

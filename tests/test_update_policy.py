"""The update policy (edge_agent/update.py) against the TUF/Uptane attacks, pure.

A table of named cases per check, each run against the pure functions: no NATS, no
hub, no agent process, milliseconds in all. tests/test_attacks.py runs the same
attacks end to end against a real agent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import blake3
import msgpack
import pytest

from edge_agent import protocol as proto
from edge_agent.errors import (
    AgentError,
    BlobTooLarge,
    DeviceBundleError,
    DigestMismatch,
    FetchError,
    InclusionPending,
    InclusionRefused,
    ModelRuntimeError,
    NotPublished,
    ProtocolError,
    TransferError,
    TrustError,
    UpdateRefused,
)
from edge_agent.trust.chain import RootRotationError
from edge_agent.trust.root import TrustRoot
from edge_agent.update import (
    EXPIRY_SKEW_NS,
    Counters,
    check_assignment,
    check_manifest,
    clock_behind_ns,
)
from ledger.signing import SigningKey

HOUR = 3600 * 10**9
DEVICE = "dev-1"
DIGEST = "ab" * 32


@dataclass(frozen=True)
class Keys:
    root: SigningKey
    release: SigningKey
    director: SigningKey
    log: SigningKey
    rogue: SigningKey


KEYS = Keys(*(SigningKey.generate() for _ in range(5)))
ROOT = TrustRoot.from_envelope(TrustRoot.build({
    "root": [KEYS.root], "release": [KEYS.release], "director": [KEYS.director],
    "log": [KEYS.log],
}))


def manifest(**changes: Any) -> proto.ReleaseManifest:
    now = time.time_ns()
    base = proto.ReleaseManifest(
        name="kws", version="2", digest=DIGEST, size=1000, format="tflite", inputs=[],
        outputs=[], created=now, expires=now + HOUR,
    )
    return replace(base, **changes)


def sign(doc: dict[str, Any], key: SigningKey, domain: str) -> bytes:
    return proto.SignedEnvelope.sign(doc, domain, [key]).encode()


def signed_manifest(**changes: Any) -> bytes:
    return sign(manifest(**changes).to_map(), KEYS.release, proto.DOMAIN_MANIFEST)


GOOD_MANIFEST = signed_manifest()


def assignment(**changes: Any) -> proto.Assignment:
    now = time.time_ns()
    base = proto.Assignment(
        device=DEVICE, model="kws", version="2", digest=DIGEST,
        manifest_hash=blake3.blake3(GOOD_MANIFEST).hexdigest(), counter=5, rollout="",
        issued_at=now, expires=now + HOUR,
    )
    return replace(base, **changes)


def signed_assignment(key: SigningKey = KEYS.director, domain: str = proto.DOMAIN_ASSIGNMENT,
                      **changes: Any) -> bytes:
    return sign(assignment(**changes).to_map(), key, domain)


def tampered(data: bytes) -> bytes:
    """The envelope with one byte of its signed document changed."""
    envelope = proto.SignedEnvelope.decode(data, "test")
    signed = bytearray(envelope.signed)
    signed[-1] ^= 0x01
    return replace(envelope, signed=bytes(signed)).encode()


# ---------------------------------------------------------------- assignments

# name -> (assignment bytes, counters, error type or None, words in the message)
ASSIGNMENT_REFUSALS: dict[str, tuple[Callable[[], bytes], Counters, type[Exception], str]] = {
    "arbitrary software: bad signature": (
        lambda: tampered(signed_assignment()), Counters(last=4), TrustError,
        "0 valid signature"),
    "arbitrary software: rogue key": (
        lambda: signed_assignment(KEYS.rogue), Counters(last=4), TrustError,
        "0 valid signature(s) from the director role"),
    "wrong key role: signed by the release key": (
        lambda: signed_assignment(KEYS.release), Counters(last=4), TrustError,
        "from the director role"),
    "signature replayed from another domain": (
        lambda: signed_assignment(domain=proto.DOMAIN_MANIFEST), Counters(last=4), TrustError,
        "valid signature"),
    "freeze: expired assignment": (
        lambda: signed_assignment(expires=time.time_ns() - HOUR), Counters(last=4), TrustError,
        "expired"),
    "mix and match: assignment for another device": (
        lambda: signed_assignment(device="dev-2"), Counters(last=4), UpdateRefused,
        "is for device dev-2, not dev-1"),
    "rollback: older valid assignment replayed": (
        lambda: signed_assignment(counter=3), Counters(last=5), UpdateRefused,
        "counter 3 is not above the last seen 5"),
    "rollback below the update in progress": (
        lambda: signed_assignment(counter=6), Counters(last=5, inflight=7), UpdateRefused,
        "counter 6 is not above the last seen 7"),
    "malformed msgpack": (
        lambda: b"\xc1\x00garbage", Counters(last=4), ProtocolError, "assignment"),
    "not a map": (
        lambda: msgpack.packb([1, 2, 3]), Counters(last=4), ProtocolError, "expected a map"),
    "a manifest signed by the director as an assignment": (
        lambda: sign(manifest().to_map(), KEYS.director, proto.DOMAIN_ASSIGNMENT),
        Counters(last=4), ProtocolError, "expected a 'assignment' document"),
}


@pytest.mark.parametrize("case", sorted(ASSIGNMENT_REFUSALS))
def test_assignment_refused(case: str) -> None:
    make, counters, kind, words = ASSIGNMENT_REFUSALS[case]
    with pytest.raises(kind, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        check_assignment(ROOT, DEVICE, counters, make())
    assert isinstance(info.value, UpdateRefused)  # reported, never retried


def test_a_replayed_assignment_is_refused_with_its_fields_for_the_report() -> None:
    with pytest.raises(UpdateRefused) as info:
        check_assignment(ROOT, DEVICE, Counters(last=9), signed_assignment(counter=3))
    assert info.value.assignment is not None and info.value.assignment.counter == 3


# name -> (counter, counters, applied?)
ASSIGNMENT_ACCEPTED: dict[str, tuple[int, Counters, bool]] = {
    "newer than everything": (5, Counters(last=4), True),
    "newer than the one in progress": (8, Counters(last=5, inflight=7), True),
    "first assignment ever": (1, Counters(last=0), True),
    "installed but not recorded (crash after the switch)": (
        6, Counters(last=5, installed=6), True),
    "the one being installed now": (7, Counters(last=5, inflight=7), False),
    "the one installed and recorded": (5, Counters(last=5, installed=5), False),
    "the last one handled (refused or reverted before)": (5, Counters(last=5), False),
}


@pytest.mark.parametrize("case", sorted(ASSIGNMENT_ACCEPTED))
def test_assignment_counter_rules(case: str) -> None:
    counter, counters, applied = ASSIGNMENT_ACCEPTED[case]
    result = check_assignment(ROOT, DEVICE, counters, signed_assignment(counter=counter))
    if applied:
        assert result is not None and result.counter == counter
    else:
        assert result is None


# name -> (counter, counters, expired this long ago, applied?): an expired assignment
# that is not news is no fault (the device keeps running it, waits for the renewal);
# clocks may disagree by EXPIRY_SKEW_NS.
EXPIRY_CASES: dict[str, tuple[int, Counters, int, bool]] = {
    "installed and recorded, expired since": (5, Counters(last=5, installed=5), HOUR, False),
    "installed, not recorded (crash), expired since": (
        6, Counters(last=5, installed=6), HOUR, False),
    "handled before, expired since": (5, Counters(last=5), HOUR, False),
    "new, expired within the skew": (6, Counters(last=5), EXPIRY_SKEW_NS // 2, True),
}


@pytest.mark.parametrize("case", sorted(EXPIRY_CASES))
def test_assignment_expiry_rules(case: str) -> None:
    counter, counters, ago, applied = EXPIRY_CASES[case]
    now = time.time_ns()
    data = signed_assignment(counter=counter, issued_at=now - 30 * HOUR, expires=now - ago)
    result = check_assignment(ROOT, DEVICE, counters, data, now_ns=now)
    assert (result is not None) == applied


def test_a_device_clock_behind_the_hub_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    now = time.time_ns()
    data = signed_assignment(counter=5, issued_at=now + 2 * HOUR, expires=now + 3 * HOUR)
    assert clock_behind_ns(assignment(issued_at=now + 2 * HOUR), now) == 2 * HOUR
    assert clock_behind_ns(assignment(issued_at=now + EXPIRY_SKEW_NS // 2), now) == 0
    with caplog.at_level("WARNING", logger="edge_agent"):
        assert check_assignment(ROOT, DEVICE, Counters(last=4), data, now_ns=now) is not None
    assert "clock is at least 7200 s behind the hub's" in caplog.text


# ---------------------------------------------------------------- manifests


def for_manifest(raw: bytes, **changes: Any) -> proto.Assignment:
    """An assignment that names `raw` by hash (a director who signs what it is given)."""
    return assignment(manifest_hash=blake3.blake3(raw).hexdigest(), **changes)


# name -> (assignment, manifest bytes, error type, words in the message)
MANIFEST_REFUSALS: dict[str, tuple[Callable[[], tuple[proto.Assignment, bytes]],
                                   type[Exception], str]] = {
    "another manifest than the one named (hash differs)": (
        lambda: (assignment(), signed_manifest(size=999)), UpdateRefused, "hash differs"),
    "wrong key role: manifest signed by the director": (
        lambda: (lambda raw: (for_manifest(raw), raw))(
            sign(manifest().to_map(), KEYS.director, proto.DOMAIN_MANIFEST)),
        TrustError, "from the release role"),
    "arbitrary software: rogue release key": (
        lambda: (lambda raw: (for_manifest(raw), raw))(
            sign(manifest().to_map(), KEYS.rogue, proto.DOMAIN_MANIFEST)),
        TrustError, "0 valid signature"),
    "root signature replayed as a manifest signature": (
        lambda: (lambda raw: (for_manifest(raw), raw))(
            sign(manifest().to_map(), KEYS.release, proto.DOMAIN_ROOT)),
        TrustError, "valid signature"),
    "freeze: expired manifest": (
        lambda: (lambda raw: (for_manifest(raw), raw))(signed_manifest(expires=1)),
        TrustError, "expired"),
    "mix and match: manifest of another version": (
        lambda: (lambda raw: (for_manifest(raw), raw))(signed_manifest(version="1")),
        UpdateRefused, "disagree on model, version or digest"),
    "mix and match: manifest of another model": (
        lambda: (lambda raw: (for_manifest(raw), raw))(signed_manifest(name="other")),
        UpdateRefused, "disagree on model, version or digest"),
    "mix and match: manifest of another blob (digest)": (
        lambda: (lambda raw: (for_manifest(raw), raw))(signed_manifest(digest="cd" * 32)),
        UpdateRefused, "disagree on model, version or digest"),
    "malformed manifest bytes": (
        lambda: (for_manifest(b"\xc1"), b"\xc1"), ProtocolError, "release manifest"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_REFUSALS))
def test_manifest_refused(case: str) -> None:
    make, kind, words = MANIFEST_REFUSALS[case]
    target, raw = make()
    with pytest.raises(kind, match=words):
        check_manifest(ROOT, target, raw)


def test_the_named_manifest_is_accepted() -> None:
    accepted = check_manifest(ROOT, assignment(), GOOD_MANIFEST)
    assert (accepted.name, accepted.version, accepted.digest, accepted.size) == (
        "kws", "2", DIGEST, 1000)


# ---------------------------------------------------------------- the error hierarchy

# name -> (error, what it must be: refused (not retried) or a transfer error (retried))
HIERARCHY: dict[str, tuple[type[Exception], type[Exception]]] = {
    "ProtocolError": (ProtocolError, UpdateRefused),
    "TrustError": (TrustError, UpdateRefused),
    "RootRotationError": (RootRotationError, UpdateRefused),
    "DigestMismatch": (DigestMismatch, UpdateRefused),
    "BlobTooLarge": (BlobTooLarge, UpdateRefused),
    "InclusionRefused": (InclusionRefused, UpdateRefused),
    "FetchError": (FetchError, TransferError),
    "NotPublished": (NotPublished, TransferError),
    "InclusionPending": (InclusionPending, TransferError),
    "DeviceBundleError": (DeviceBundleError, AgentError),
    "ModelRuntimeError": (ModelRuntimeError, AgentError),
}


@pytest.mark.parametrize("name", sorted(HIERARCHY))
def test_error_hierarchy(name: str) -> None:
    error, parent = HIERARCHY[name]
    assert issubclass(error, parent) and issubclass(error, AgentError)
    assert not (issubclass(error, UpdateRefused) and issubclass(error, TransferError))


def test_wire_and_bundle_errors_stay_value_errors() -> None:
    # The hub catches ProtocolError (and callers TrustError) as ValueError.
    assert issubclass(ProtocolError, ValueError) and issubclass(TrustError, ValueError)
    assert issubclass(DeviceBundleError, ValueError)

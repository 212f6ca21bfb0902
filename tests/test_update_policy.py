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
    StaleAuthority,
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
    check_timestamp,
    clock_behind_ns,
    root_digest,
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


# ---------------------------------------------------------------- freshness (timestamps)

TIMESTAMP_KEY = SigningKey.generate()


def root_with_timestamp(version: int, expires: int) -> TrustRoot:
    return TrustRoot.from_envelope(TrustRoot.build({
        "root": [KEYS.root], "release": [KEYS.release], "director": [KEYS.director],
        "log": [KEYS.log], "timestamp": [TIMESTAMP_KEY],
    }, version=version, expires=expires))


TS_ROOT = root_with_timestamp(3, time.time_ns() + 100 * HOUR)  # the root the device holds
# The same version with other bytes (another `expires`): a fork the timestamp must pin.
OTHER_ROOT_3 = root_with_timestamp(3, TS_ROOT.expires + HOUR)


def stamp(key: SigningKey = TIMESTAMP_KEY, domain: str = proto.DOMAIN_TIMESTAMP,
          root: TrustRoot = TS_ROOT, **changes: Any) -> bytes:
    now = time.time_ns()
    doc = proto.Timestamp(version=7, root_version=root.version, root_digest=root_digest(root),
                          issued=now - 60 * 10**9, expires=now + HOUR)
    return sign(replace(doc, **changes).to_map(), key, domain)


# name -> (timestamp bytes or None, last accepted version, kind, words in the message)
TIMESTAMP_REFUSALS: dict[str, tuple[Callable[[], bytes | None], int, str, str]] = {
    "freeze: no timestamp published (withheld)": (lambda: None, 0, "missing", "no timestamp"),
    "freeze: expired timestamp": (
        lambda: stamp(issued=time.time_ns() - 3 * HOUR,
                      expires=time.time_ns() - EXPIRY_SKEW_NS - HOUR),
        0, "expired", "expired"),
    "future-dated beyond the skew tolerance": (
        lambda: stamp(issued=time.time_ns() + EXPIRY_SKEW_NS + HOUR,
                      expires=time.time_ns() + 3 * HOUR),
        0, "future", "in this device's future"),
    "withheld rotation: names a newer root": (
        lambda: stamp(root_version=4), 0, "root_newer",
        "names trust root 4 but this device holds 3"),
    "stale: names an older root": (
        lambda: stamp(root_version=2), 0, "root_older", "older than the 3 this device holds"),
    "names another root of the same version (digest)": (
        lambda: stamp(root=OTHER_ROOT_3), 0, "root_digest", "digest differs"),
    "bad signature (tampered)": (lambda: tampered(stamp()), 0, "refused", "0 valid signature"),
    "signed by the director key, not the timestamp role": (
        lambda: stamp(KEYS.director), 0, "refused", "from the timestamp role"),
    "signature replayed from another domain": (
        lambda: stamp(domain=proto.DOMAIN_ASSIGNMENT), 0, "refused", "valid signature"),
    "an assignment signed by the timestamp key as a timestamp": (
        lambda: sign(assignment().to_map(), TIMESTAMP_KEY, proto.DOMAIN_TIMESTAMP), 0,
        "refused", "expected a 'timestamp' document"),
    "malformed bytes": (lambda: b"\xc1\x00", 0, "refused", "timestamp"),
    "replay: an older timestamp, still unexpired": (
        lambda: stamp(version=6), 7, "replayed", "older than the last accepted 7"),
}


@pytest.mark.parametrize("case", sorted(TIMESTAMP_REFUSALS))
def test_timestamp_refused(case: str) -> None:
    make, last, kind, words = TIMESTAMP_REFUSALS[case]
    with pytest.raises(StaleAuthority, match=words.replace("(", r"\(").replace(")", r"\)")
                       ) as info:
        check_timestamp(TS_ROOT, make(), last)
    assert info.value.kind == kind
    assert isinstance(info.value, UpdateRefused) and isinstance(info.value, TrustError)


# name -> (timestamp changes, given the time now; last accepted version): accepted
TIMESTAMP_ACCEPTED: dict[str, tuple[Callable[[int], dict[str, int]], int]] = {
    "fresh, first one ever": (lambda now: {}, 0),
    "monotonic: newer than the last accepted": (lambda now: {"version": 8}, 7),
    "monotonic: the same one again": (lambda now: {"version": 7}, 7),
    "expired within the skew tolerance": (
        lambda now: {"expires": now - EXPIRY_SKEW_NS // 2}, 0),
    "issued in the future within the skew tolerance": (
        lambda now: {"issued": now + EXPIRY_SKEW_NS // 2}, 0),
}


@pytest.mark.parametrize("case", sorted(TIMESTAMP_ACCEPTED))
def test_timestamp_accepted(case: str) -> None:
    make, last = TIMESTAMP_ACCEPTED[case]
    now = time.time_ns()
    changes = make(now)
    accepted = check_timestamp(TS_ROOT, stamp(**changes), last, now_ns=now)
    assert accepted is not None and accepted.root_version == TS_ROOT.version
    assert accepted.version == changes.get("version", 7)


def test_monotonic_never_back_to_an_older_timestamp() -> None:
    """A device that accepted timestamp 9 refuses every lower version, however fresh."""
    assert check_timestamp(TS_ROOT, stamp(version=9), 0) is not None
    for older in (1, 8):
        with pytest.raises(StaleAuthority, match="replay refused"):
            check_timestamp(TS_ROOT, stamp(version=older), 9)


def test_a_root_without_a_timestamp_role_asks_for_none() -> None:
    # Roots from a hub made before the timestamp role: nothing to check against.
    assert "timestamp" not in ROOT.roles
    assert check_timestamp(ROOT, None, 0) is None


# ---------------------------------------------------------------- the error hierarchy

# name -> (error, what it must be: refused (not retried) or a transfer error (retried))
HIERARCHY: dict[str, tuple[type[Exception], type[Exception]]] = {
    "ProtocolError": (ProtocolError, UpdateRefused),
    "TrustError": (TrustError, UpdateRefused),
    "StaleAuthority": (StaleAuthority, TrustError),
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

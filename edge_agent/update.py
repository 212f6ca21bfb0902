"""The update policy, pure: is this assignment for us and new, is this manifest the one
it names? (python-tuf's TrustedMetadataSet plays this part there.)

No I/O: the caller fetches the bytes (edge_agent.transport) and keeps the counters on
disk (edge_agent.agent). Every refusal is an `UpdateRefused` (edge_agent.errors) whose
message says what is wrong; a `ProtocolError` or `TrustError` is one too.

Counter rules (anti-rollback and replay, Uptane's "director" check):

* an assignment whose counter is the one being installed now, the one installed and
  recorded, or the last one handled (refused or reverted before, and reported then) is
  not news: `check_assignment` returns None;
* a counter below the last one seen (or below the one in progress) is refused: an older
  valid assignment replayed, or a rollback;
* anything above, or installed but not recorded (a crash right after the switch), is
  (re)applied.

Expiry rules (an assignment's `expires`, checked against the device's clock with
EXPIRY_SKEW_NS of tolerance, since device and hub clocks disagree):

* an expired assignment that is not news (the one installed or handled) is no fault:
  the model it installed keeps running, nothing bad is reported, and the device waits
  for the renewed one (the hub re-signs live assignments before they expire); a device
  that was off for longer than the lifetime must not turn `failed` at its next start;
* a new assignment that has expired is refused (the hub re-signs and sends another);
* an assignment issued more than EXPIRY_SKEW_NS in the device's future says the
  device's clock is behind: logged as a warning (`clock_behind_ns`).

Freshness rules (TUF's timestamp role; `check_timestamp`): a new assignment is
installed only with a timestamp that

* a threshold of the trusted root's `timestamp` role signed;
* is not older (by `version`) than the last one this device accepted (a replayed
  older timestamp is refused even while unexpired);
* has not expired and was not issued in the device's future, each with EXPIRY_SKEW_NS
  of tolerance;
* names the trust root this device holds (version and BLAKE3 digest): a timestamp that
  names a newer root says a rotation is withheld (or not fetched yet), one that names an
  older root is stale.

Otherwise `StaleAuthority`: nothing new is installed, nothing is recorded, the model
that runs keeps running, and the agent asks again later. A root without a `timestamp`
role (made by a hub that predates it) asks for no timestamp: `check_timestamp` returns
None.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import blake3

from edge_agent import protocol as proto
from edge_agent.errors import ProtocolError, StaleAuthority, TrustError, UpdateRefused
from edge_agent.trust.root import TrustRoot

log = logging.getLogger("edge_agent")

# Clocks of the hub and of devices may disagree by this much without an expiry check
# tripping (tests lower it to see an expiry without waiting five minutes).
EXPIRY_SKEW_NS = 5 * 60 * 10**9


@dataclass(frozen=True)
class Counters:
    """The assignment counters a device knows of."""

    last: int  # the last counter handled (installed, refused or reverted), on disk
    inflight: int | None = None  # the counter being installed now
    installed: int | None = None  # the counter of the model running now


def clock_behind_ns(assignment: proto.Assignment, now_ns: int) -> int:
    """How far this device's clock is behind the hub's, as far as `assignment` shows
    (it cannot have been issued in the future); 0 within EXPIRY_SKEW_NS."""
    behind = assignment.issued_at - now_ns
    return behind if behind > EXPIRY_SKEW_NS else 0


def check_assignment(
    trust: TrustRoot, device_id: str, counters: Counters, data: bytes,
    now_ns: int | None = None,
) -> proto.Assignment | None:
    """The assignment if it is authentic, for `device_id` and new; None if it was
    already handled (also when it has expired since: see the module docstring). Raises
    UpdateRefused (with `assignment` set when the assignment is authentic and for this
    device)."""
    now = time.time_ns() if now_ns is None else now_ns
    envelope = proto.SignedEnvelope.decode(data, "assignment")
    # The signature first; expiry is judged below, once we know if it is news.
    trust.check_signatures(envelope, "director", proto.DOMAIN_ASSIGNMENT)
    assignment = proto.Assignment.from_map(envelope.document(proto.DOMAIN_ASSIGNMENT))
    if assignment.device != device_id:
        raise UpdateRefused(f"assignment is for device {assignment.device}, not {device_id}")
    behind = clock_behind_ns(assignment, now)
    if behind:
        log.warning("this device's clock is at least %.0f s behind the hub's (assignment "
                    "%d was issued in its future); check its time source",
                    behind / 1e9, assignment.counter)
    expired = now > assignment.expires + EXPIRY_SKEW_NS
    if expired and assignment.counter == counters.installed:
        log.info("assignment %d (running) has expired; keeps running until the hub's "
                 "renewed assignment arrives", assignment.counter)
        return None
    news = _news(assignment, counters)
    if news is not None and expired:
        raise TrustError(f"assignment expired (counter {assignment.counter}); the hub must "
                         "re-sign it", assignment)
    return news


TIMESTAMP_ROLE = "timestamp"


def root_digest(trust: TrustRoot) -> str:
    """BLAKE3 hex of the trusted root's envelope, as a timestamp names it."""
    return blake3.blake3(trust.envelope.encode()).hexdigest()


def check_timestamp(
    trust: TrustRoot, data: bytes | None, last_version: int, now_ns: int | None = None,
) -> proto.Timestamp | None:
    """The timestamp `data` if it shows `trust` is the newest root, now (see the module
    docstring); None if `trust` has no timestamp role. Raises StaleAuthority.
    `last_version` is the version of the newest timestamp accepted before (0: none)."""
    if TIMESTAMP_ROLE not in trust.roles:
        return None
    now = time.time_ns() if now_ns is None else now_ns
    if data is None:
        raise StaleAuthority("no timestamp published: cannot tell that trust root "
                             f"{trust.version} is still the newest", "missing")
    try:
        envelope = proto.SignedEnvelope.decode(data, "timestamp")
        trust.check_signatures(envelope, TIMESTAMP_ROLE, proto.DOMAIN_TIMESTAMP)
        stamp = proto.Timestamp.from_map(envelope.document(proto.DOMAIN_TIMESTAMP))
    except (ProtocolError, TrustError) as exc:
        raise StaleAuthority(f"timestamp refused: {exc}", "refused") from exc
    if stamp.version < last_version:
        raise StaleAuthority(f"timestamp version {stamp.version} is older than the last "
                             f"accepted {last_version}: replay refused", "replayed")
    if now > stamp.expires + EXPIRY_SKEW_NS:
        raise StaleAuthority(
            f"timestamp {stamp.version} expired {(now - stamp.expires) / 1e9:.0f} s ago: "
            "the hub's authority cannot be shown fresh (frozen or withheld)", "expired")
    if stamp.issued > now + EXPIRY_SKEW_NS:
        raise StaleAuthority(
            f"timestamp {stamp.version} was issued {(stamp.issued - now) / 1e9:.0f} s in "
            "this device's future, beyond the clock skew tolerance", "future")
    if stamp.root_version > trust.version:
        raise StaleAuthority(
            f"timestamp names trust root {stamp.root_version} but this device holds "
            f"{trust.version}: a newer root is withheld or not fetched yet", "root_newer")
    if stamp.root_version < trust.version:
        raise StaleAuthority(
            f"timestamp names trust root {stamp.root_version}, older than the "
            f"{trust.version} this device holds: stale timestamp", "root_older")
    if stamp.root_digest != root_digest(trust):
        raise StaleAuthority(
            f"timestamp names another trust root {stamp.root_version} than the one this "
            "device holds (digest differs)", "root_digest")
    return stamp


def _news(assignment: proto.Assignment, counters: Counters) -> proto.Assignment | None:
    counter, last, inflight = assignment.counter, counters.last, counters.inflight
    if counter == inflight:
        log.info("assignment %d is already being installed", counter)
        return None
    if counter == counters.installed and counter <= last:
        log.info("assignment %d already installed", counter)
        return None
    if counter == last:
        log.info("assignment %d was already handled", counter)
        return None  # refused or reverted before, and reported then
    if counter < max(last, inflight or 0):
        raise UpdateRefused(
            f"assignment counter {counter} is not above the last seen "
            f"{max(last, inflight or 0)}: rollback or replay refused",
            assignment,
        )
    return assignment


def check_manifest(
    trust: TrustRoot, assignment: proto.Assignment, raw: bytes
) -> proto.ReleaseManifest:
    """The release manifest `raw` if it is the one `assignment` names (by hash), the
    release role signed it, and it agrees with the assignment on model, version and
    digest (no mix and match). Raises UpdateRefused."""
    key = proto.manifest_key(assignment.model, assignment.version)
    if blake3.blake3(raw).hexdigest() != assignment.manifest_hash:
        raise UpdateRefused(f"manifest {key} is not the one the assignment names (hash differs)")
    envelope = proto.SignedEnvelope.decode(raw, "release manifest")
    manifest = proto.ReleaseManifest.from_map(
        trust.verify(envelope, "release", proto.DOMAIN_MANIFEST)
    )
    if (manifest.name, manifest.version, manifest.digest) != (
        assignment.model, assignment.version, assignment.digest
    ):
        raise UpdateRefused("manifest and assignment disagree on model, version or digest")
    return manifest

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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import blake3

from edge_agent import protocol as proto
from edge_agent.errors import UpdateRefused
from edge_agent.trust.root import TrustRoot

log = logging.getLogger("edge_agent")


@dataclass(frozen=True)
class Counters:
    """The assignment counters a device knows of."""

    last: int  # the last counter handled (installed, refused or reverted), on disk
    inflight: int | None = None  # the counter being installed now
    installed: int | None = None  # the counter of the model running now


def check_assignment(
    trust: TrustRoot, device_id: str, counters: Counters, data: bytes
) -> proto.Assignment | None:
    """The assignment if it is authentic, for `device_id` and new; None if it was
    already handled. Raises UpdateRefused (with `assignment` set when the assignment
    is authentic and for this device)."""
    envelope = proto.SignedEnvelope.decode(data, "assignment")
    doc = trust.verify(envelope, "director", proto.DOMAIN_ASSIGNMENT)
    assignment = proto.Assignment.from_map(doc)
    if assignment.device != device_id:
        raise UpdateRefused(f"assignment is for device {assignment.device}, not {device_id}")
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

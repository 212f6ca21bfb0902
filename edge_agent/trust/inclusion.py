"""Model transparency on the device: install a release only if its ledger entry is
provably in a checkpoint signed by the log and cosigned by enough witnesses.

The hub publishes, per release, a proof bundle (ledger/bundle.py, format
`fleetledger-proof/1`) in the KV bucket `transparency` under `<name>.<version>` once a
checkpoint covering the release's `model.released` entry carries the trust root's
witness threshold of cosignatures (hub/log/transparency.py). `verify_release_inclusion`
(pure) checks it against the device's trust root alone:

* the checkpoint is signed by a `log` role key of the root, under the key's `name` (the
  log origin), and its origin is that name;
* at least the `witness` role's threshold of distinct witness keys of the root (each
  under its `name`) cosigned it, and every listed witness's cosignature verifies;
* the RFC 9162 inclusion proof leads from HASH(0x00 || body) at the entry's seq to the
  checkpoint's root at its tree size; the entry's chain hash matches prev and body;
* the body is a `model.released` (or `model.resigned`, after a release-key revocation)
  entry for the assignment's model and version whose `manifest_hash` is the
  assignment's.

A missing bundle is `InclusionPending` (released but not witnessed yet: wait), a bad
one `InclusionRefused` (an attack or a broken hub: refuse). See docs/PROTOCOL.md
("Model transparency").
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.errors import InclusionPending, InclusionRefused
from edge_agent.protocol.documents import Assignment
from edge_agent.trust.root import TrustRoot
from ledger.bundle import BundleReport, verify_bundle
from ledger.errors import BundleError, NoteError
from ledger.note import CosignatureVerifier, Verifier

__all__ = [
    "RELEASE_KINDS",
    "InclusionPending",
    "InclusionRefused",
    "TransparencyKeys",
    "transparency_keys",
    "verify_release_inclusion",
]

RELEASE_KINDS = ("model.released", "model.resigned")
WITNESS_ROLE = "witness"


@dataclass(frozen=True)
class TransparencyKeys:
    """What a trust root says about the log and its witnesses."""

    logs: list[Verifier]
    witnesses: list[CosignatureVerifier]
    threshold: int


def transparency_keys(root: TrustRoot) -> TransparencyKeys:
    """The log and witness note verifiers of a root; `InclusionPending` if it names no
    log key or lists no witnesses (a later root may add them)."""
    try:
        logs = [Verifier(root.names[k], root.keys[k].raw)
                for k in (root.roles["log"].keyids if "log" in root.roles else ())
                if k in root.names and k in root.keys]
        spec = root.roles.get(WITNESS_ROLE)
        witnesses = [CosignatureVerifier(root.names[k], root.keys[k].raw)
                     for k in (spec.keyids if spec is not None else ())
                     if k in root.names and k in root.keys]
    except NoteError as exc:
        raise InclusionRefused(f"trust root version {root.version} names a key "
                               f"badly: {exc}") from exc
    if not logs:
        raise InclusionPending(f"trust root version {root.version} names no log key "
                               "(`hub witness add` names it)")
    if spec is None or not witnesses:
        raise InclusionPending(f"trust root version {root.version} lists no witnesses "
                               "(`hub witness add`)")
    return TransparencyKeys(logs, witnesses, spec.threshold)


def verify_release_inclusion(root: TrustRoot, data: bytes, assignment: Assignment) -> BundleReport:
    """Check a transparency bundle for `assignment`'s release; raise `InclusionRefused`
    naming the failed check (or `InclusionPending` if the root lists no witnesses)."""
    keys = transparency_keys(root)
    report: BundleReport | None = None
    errors = []
    for log in keys.logs:  # after a log-key rotation the root lists several
        try:
            report = verify_bundle(data, log, keys.witnesses, keys.threshold)
            break
        except BundleError as exc:
            errors.append(str(exc))
    if report is None:
        raise InclusionRefused("transparency proof refused: " + "; ".join(errors))
    entry = report.entry
    if entry.kind not in RELEASE_KINDS:
        raise InclusionRefused(f"transparency proof refused: the proven entry (seq "
                               f"{entry.seq}) is {entry.kind!r}, not a release")
    payload = entry.payload
    name, version = payload.get("name"), payload.get("version")
    if (name, version) != (assignment.model, assignment.version):
        raise InclusionRefused(f"transparency proof refused: the proven entry is the "
                               f"release of {name}/{version}, not {assignment.model}/"
                               f"{assignment.version}")
    if payload.get("manifest_hash") != assignment.manifest_hash:
        raise InclusionRefused("transparency proof refused: the ledger's release has "
                               "another manifest hash than the assignment (a manifest "
                               "that was never published in the log)")
    return report

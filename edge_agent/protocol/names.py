"""Every NATS name the hub and the devices share: buckets, streams, subjects, KV keys.

One module, so a rename is one edit and a reader sees the whole namespace at once (see
docs/PROTOCOL.md). The hub's NATS permissions (hub/home/nats_config.py) are built from
these names, so a device's rights follow them too. No I/O.
"""

from __future__ import annotations

from typing import Final

from edge_agent.protocol.documents import check_device_id, check_model_ref

# ---------------------------------------------------------------- buckets

# Object Store of every blob the hub accepted (models, validation sets, validation
# details), named by BLAKE3 digest. Only the hub reads or writes it.
MODELS_BUCKET: Final = "models"
# Object Store of released model blobs only (copied from MODELS_BUCKET at release): the
# one bucket devices may read.
RELEASES_BUCKET: Final = "releases"
MANIFESTS_BUCKET: Final = "manifests"  # KV: signed release manifests, manifest_key()
ASSIGNMENTS_BUCKET: Final = "assignments"  # KV: one signed assignment per device id
ROOTS_BUCKET: Final = "roots"  # KV: trust roots, root_key() and ROOT_LATEST_KEY
TRANSPARENCY_BUCKET: Final = "transparency"  # KV: proof bundles, transparency_key()

# ---------------------------------------------------------------- KV keys

ROOT_LATEST_KEY: Final = "root.latest"
# The signed timestamp (short-lived; names the newest root), in the `roots` bucket: every
# device may already read that bucket, and a device's one extra read is one KV get.
TIMESTAMP_KEY: Final = "timestamp"


def root_key(version: int) -> str:
    """KV key of root `version` in the `roots` bucket."""
    return f"root.{version}"


def manifest_key(name: str, version: str) -> str:
    """KV key of a release manifest (`.` is the KV hierarchy separator)."""
    check_model_ref(name, version)
    return f"{name}.{version}"


def transparency_key(name: str, version: str) -> str:
    """KV key of a release's transparency (proof) bundle."""
    return f"{name}.{version}"


def assignment_key(device: str) -> str:
    """KV key of a device's assignment: the device id itself."""
    return check_device_id(device)


# ---------------------------------------------------------------- streams

REPORTS_STREAM: Final = "REPORTS"
# The hub's durable consumers on REPORTS (hub.devices.reports): every hub process pulls
# from REPORTS_DURABLE (all report subjects; it counts telemetry), the leader alone from
# STATUS_DURABLE (status subjects only; they become ledger events).
REPORTS_DURABLE: Final = "hub-reports"
STATUS_DURABLE: Final = "hub-status"
STATUS_REPORT_SUBJECTS: Final = "fleet.report.*.status"
LEDGER_STREAM: Final = "LEDGER"
# Staging of operator uploads: the hub reads an upload's chunks, checks them, stores the
# blob in MODELS_BUCKET itself and purges the upload (hub.uploads).
UPLOADS_STREAM: Final = "UPLOADS"
UPLOAD_SUBJECTS: Final = "upload.>"
UPLOAD_CHUNK_BYTES: Final = 128 * 1024  # the payload of one upload message
UPLOAD_CHUNK_HEADER: Final = "Fleet-Upload-Chunk"  # 0-based index of the chunk

# ---------------------------------------------------------------- subjects

API_PREFIX: Final = "hub.api."  # operator commands: hub.api.<verb>
# Enrolment requests of devices that made their own key (the `enrol` NATS user may
# publish here and nothing else); answered only under ENROL_INBOX_ROOT.
ENROL_SUBJECT: Final = "hub.enrol"
ENROL_INBOX_ROOT: Final = "_INBOX_ENROL"
REPORT_SUBJECTS: Final = "fleet.report.>"
# The ledger's own feed (ledger.net.remote.ENTRY_SUBJECT / CHECKPOINT_SUBJECT; a test
# checks they agree: the ledger cannot import this package).
LEDGER_ENTRY_SUBJECT: Final = "ledger.entry"
LEDGER_CHECKPOINT_SUBJECT: Final = "ledger.checkpoint"


def report_subject(device: str, kind: str) -> str:
    """Where a device publishes a report of `kind` (`status` or `telemetry`)."""
    return f"fleet.report.{check_device_id(device)}.{kind}"


def device_report_subjects(device: str) -> str:
    """Every report subject of one device (its only publish permission for reports)."""
    return f"fleet.report.{device}.>"


def upload_subject(keyid: str, upload_id: str) -> str:
    """Where the operator with key id `keyid` publishes the chunks of one upload (its only
    publish permission for uploads is `upload_subjects(keyid)`)."""
    return f"upload.{keyid}.{upload_id}"


def upload_subjects(keyid: str) -> str:
    """Every upload subject of one operator."""
    return f"upload.{keyid}.>"


def report_msg_id(device: str, boot: str, seq: int) -> str:
    """The JetStream message id of a report: JetStream and the hub drop duplicates."""
    return f"{device}.{boot}.{seq}"

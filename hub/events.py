"""The catalog of ledger event kinds the hub writes, and their payload fields.

One place for every kind, so docs/PROTOCOL.md ("Event catalog") and the projections
agree. Payloads are maps; readers keep fields they do not know. Events caused by an
operator carry the signed command envelope in `command` (on the first event of the
command) and have the operator's key id as actor.
"""

from __future__ import annotations

from typing import Final

HUB_ACTOR: Final = "hub"

OPERATOR_ADDED: Final = "operator.added"
OPERATOR_REVOKED: Final = "operator.revoked"
MODEL_REGISTERED: Final = "model.registered"
MODEL_VALIDATED: Final = "model.validated"
MODEL_APPROVED: Final = "model.approved"
MODEL_REJECTED: Final = "model.rejected"
MODEL_RELEASED: Final = "model.released"
MODEL_DEPRECATED: Final = "model.deprecated"
MODEL_REVOKED: Final = "model.revoked"
DEVICE_ENROLLED: Final = "device.enrolled"
DEVICE_REVOKED: Final = "device.revoked"
DEVICE_TOKEN_CREATED: Final = "device.token_created"
DEPLOYMENT_CREATED: Final = "deployment.created"
DEVICE_ASSIGNED: Final = "device.assigned"
DEVICE_UPDATE_APPLIED: Final = "device.update_applied"
DEVICE_UPDATE_FAILED: Final = "device.update_failed"
DEVICE_UPDATE_REVERTED: Final = "device.update_reverted"
KEYS_ROTATED: Final = "keys.rotated"
KEYS_REVOKED: Final = "keys.revoked"
MODEL_RESIGNED: Final = "model.resigned"
MODEL_REFERENCE_REBASED: Final = "model.reference_rebased"
DEVICE_TAGGED: Final = "device.tagged"
ROLLOUT_CREATED: Final = "rollout.created"
ROLLOUT_STARTED: Final = "rollout.started"
ROLLOUT_PAUSED: Final = "rollout.paused"
ROLLOUT_RESUMED: Final = "rollout.resumed"
ROLLOUT_ABORTED: Final = "rollout.aborted"
ROLLOUT_WAVE_STARTED: Final = "rollout.wave_started"
ROLLOUT_WAVE_BAKING: Final = "rollout.wave_baking"
ROLLOUT_WAVE_COMPLETED: Final = "rollout.wave_completed"
ROLLOUT_DEVICES_TIMED_OUT: Final = "rollout.devices_timed_out"
ROLLOUT_DEVICE_ADDED: Final = "rollout.device_added"
ROLLOUT_HALTED: Final = "rollout.halted"
ROLLOUT_COMPLETED: Final = "rollout.completed"
ROLLOUT_ROLLED_BACK: Final = "rollout.rolled_back"
CONTROLLER_ACTOR: Final = "hub"  # rollout controller decisions

# `report` is the device-signed status envelope (bytes), checked with the enrolled key.
_REPORT = ("device", "model", "version", "digest", "counter", "boot", "report_seq", "report")
_KEYS = ("role", "keyid", "threshold", "version", "root")

# kind -> payload fields every event of that kind has (`command` where an operator acted)
CATALOG: Final[dict[str, tuple[str, ...]]] = {
    OPERATOR_ADDED: ("name", "keyid", "public", "roles"),
    OPERATOR_REVOKED: ("name", "keyid", "reason"),
    MODEL_REGISTERED: (
        "name", "version", "digest", "size", "format", "inputs", "outputs", "lineage", "card",
    ),
    MODEL_VALIDATED: (
        "name", "version", "passed", "failures", "metrics", "reference_histograms",
        "dataset_digest", "policy", "approvals_required",
    ),
    MODEL_APPROVED: ("name", "version", "approvals", "required"),
    # The drift reference's counts from the fleet's traffic (hub/governance/rebase.py).
    MODEL_REFERENCE_REBASED: (
        "name", "version", "histograms", "reference_digest", "previous_digest", "source",
        "min_inferences",
    ),
    MODEL_REJECTED: ("name", "version", "reason"),
    MODEL_RELEASED: ("name", "version", "digest", "manifest_hash", "manifest", "expires"),
    MODEL_DEPRECATED: ("name", "version", "reason"),
    MODEL_REVOKED: ("name", "version", "reason"),
    DEVICE_ENROLLED: ("device", "public"),
    DEVICE_REVOKED: ("device", "reason"),
    # Only the token's BLAKE3 hash: the secret itself is in the operator's answer alone.
    DEVICE_TOKEN_CREATED: ("device", "token_id", "token_hash", "expires"),
    DEPLOYMENT_CREATED: ("deployment", "model", "version", "devices"),
    DEVICE_ASSIGNED: (
        "device", "deployment", "model", "version", "digest", "counter", "manifest_hash",
        "assignment",
    ),
    DEVICE_UPDATE_APPLIED: (*_REPORT, "probe_output"),
    DEVICE_UPDATE_FAILED: (*_REPORT, "reason"),
    DEVICE_UPDATE_REVERTED: (*_REPORT, "reason"),
    DEVICE_TAGGED: ("device", "group", "tags"),
    ROLLOUT_CREATED: (
        "rollout", "model", "version", "digest", "manifest_hash", "target", "waves",
        "wave_sizes", "devices", "policy",
    ),
    ROLLOUT_STARTED: ("rollout",),
    ROLLOUT_PAUSED: ("rollout", "reason"),
    ROLLOUT_RESUMED: ("rollout",),
    ROLLOUT_ABORTED: ("rollout", "reason"),
    ROLLOUT_WAVE_STARTED: ("rollout", "wave", "devices"),
    ROLLOUT_WAVE_BAKING: ("rollout", "wave", "bake_s", "evidence"),
    ROLLOUT_WAVE_COMPLETED: ("rollout", "wave", "evidence"),
    ROLLOUT_DEVICES_TIMED_OUT: ("rollout", "wave", "devices", "deadline_s", "evidence"),
    ROLLOUT_DEVICE_ADDED: ("rollout", "wave", "device"),
    ROLLOUT_HALTED: ("rollout", "wave", "reason", "evidence"),
    ROLLOUT_COMPLETED: ("rollout", "evidence"),
    ROLLOUT_ROLLED_BACK: ("rollout", "reason", "auto", "devices", "skipped"),
}


def model_subject(name: str, version: str) -> str:
    return f"model:{name}/{version}"


def device_subject(device: str) -> str:
    return f"device:{device}"


def deployment_subject(deployment: str) -> str:
    return f"deployment:{deployment}"


def rollout_subject(rollout: str) -> str:
    return f"rollout:{rollout}"


def root_subject(version: int) -> str:
    return f"trust-root:{version}"


def operator_subject(name: str) -> str:
    return f"operator:{name}"

"""The catalog of ledger event kinds the hub writes, and their payload fields.

One place for every kind, so docs/PROTOCOL.md ("Event catalog") and the
projections agree. Payloads are maps; readers keep fields they do not know.
"""

from __future__ import annotations

from typing import Final

HUB_ACTOR: Final = "hub"

# kind -> payload fields (documentation and a check in the tests)
MODEL_REGISTERED: Final = "model.registered"
MODEL_RELEASED: Final = "model.released"
DEVICE_ENROLLED: Final = "device.enrolled"
DEPLOYMENT_CREATED: Final = "deployment.created"
DEVICE_ASSIGNED: Final = "device.assigned"
DEVICE_UPDATE_APPLIED: Final = "device.update_applied"
DEVICE_UPDATE_FAILED: Final = "device.update_failed"

CATALOG: Final[dict[str, tuple[str, ...]]] = {
    MODEL_REGISTERED: ("name", "version", "digest", "size", "format", "inputs", "outputs"),
    MODEL_RELEASED: ("name", "version", "digest", "manifest_hash", "manifest", "expires"),
    DEVICE_ENROLLED: ("device",),
    DEPLOYMENT_CREATED: ("deployment", "model", "version", "devices"),
    DEVICE_ASSIGNED: (
        "device", "deployment", "model", "version", "digest", "counter", "manifest_hash",
        "assignment",
    ),
    DEVICE_UPDATE_APPLIED: (
        "device", "model", "version", "digest", "counter", "boot", "report_seq", "probe_output",
    ),
    DEVICE_UPDATE_FAILED: (
        "device", "model", "version", "digest", "counter", "boot", "report_seq", "reason",
    ),
}


def model_subject(name: str, version: str) -> str:
    return f"model:{name}/{version}"


def device_subject(device: str) -> str:
    return f"device:{device}"


def deployment_subject(deployment: str) -> str:
    return f"deployment:{deployment}"

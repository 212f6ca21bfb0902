"""Names of the hub's NATS subjects, buckets and streams (see docs/PROTOCOL.md)."""

from __future__ import annotations

from typing import Final

MODELS_BUCKET: Final = "models"
MANIFESTS_BUCKET: Final = "manifests"
ASSIGNMENTS_BUCKET: Final = "assignments"
REPORTS_STREAM: Final = "REPORTS"
LEDGER_STREAM: Final = "LEDGER"
API_PREFIX: Final = "hub.api."
REPORTS_DURABLE: Final = "hub-reports"

"""Constants of the operator API that the `hub` CLI and the hub's read verbs share.

Pure on purpose: the CLI imports this and no server module, so an operator's
command line never loads SQLAlchemy or the hub's tables.
"""

from __future__ import annotations

TELEMETRY_PAGE = 20  # devices per `telemetry` reply unless the operator asks for more
# A summary row is ~250 bytes of msgpack: 500 of them stay well under NATS's 256 KiB.
MAX_TELEMETRY_PAGE = 500
# How `hub telemetry` can order the fleet's devices (TelemetryIngest.device_summaries).
DEVICE_SORTS = ("error-rate", "errors", "inferences", "last-seen", "device")

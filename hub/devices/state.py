"""Device state: enrolled devices and their telemetry counters (hub.fold tables)."""

from __future__ import annotations

REVOKED = "revoked"  # proj_devices.state of a revoked device

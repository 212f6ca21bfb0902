"""hub.telemetry."""

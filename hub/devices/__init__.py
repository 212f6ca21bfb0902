"""hub.devices."""

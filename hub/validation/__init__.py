"""hub.validation."""

"""hub.governance."""

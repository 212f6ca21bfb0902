"""hub.log."""

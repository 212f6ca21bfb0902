"""hub.keys."""

"""hub.home."""

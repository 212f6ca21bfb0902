"""hub.service."""

"""hub.commands."""

"""hub.rollouts."""

"""edge_agent.protocol."""

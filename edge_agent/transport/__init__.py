"""edge_agent.transport."""

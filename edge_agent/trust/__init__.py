"""edge_agent.trust."""

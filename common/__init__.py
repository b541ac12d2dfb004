"""fedgrad."""

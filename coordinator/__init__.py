"""geomesh coordinator package."""

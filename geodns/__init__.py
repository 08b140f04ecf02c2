"""geomesh geodns package."""

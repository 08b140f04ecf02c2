"""geomesh geomesh package."""

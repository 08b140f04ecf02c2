"""geomesh regional_gateway package."""

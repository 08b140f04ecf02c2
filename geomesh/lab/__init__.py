"""The multi-region lab: the whole system on one machine (see geomesh.lab.cli)."""

"""The map builder process ends with the server: a process that started one and exits without
closing it does not hang in multiprocessing's exit handler (which joins non-daemon children)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys
from geodns.map_builder import MapBuilder
if __name__ == "__main__":
    b = MapBuilder()
    b._start()
    print(b.pid, flush=True)
    # no close(): the interpreter's exit must end the builder
"""


def test_an_exit_without_close_ends_the_builder(tmp_path: Path) -> None:
    script = tmp_path / "starts_a_builder.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    pid = int(proc.stdout.split()[0])
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()

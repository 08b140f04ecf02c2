"""Where a process's CPU goes during a benchmark run, from `perf record`: for `bench/http.py --perf`.

`Recording(pid, seconds, path)` starts `perf record -g` on one process (all its threads) for a
bounded time; `split(path)` reads the profile back as shares of the samples: per shared object
(the interpreter, httptools, uvloop, libc, the kernel, ...) and, inside the kernel, the share
spent in `sock_def_readable` with its callees -- waking the task that reads the other end of a
socket this process wrote to. That wake-up is paid by the writer, inside the same `write` call,
and costs far more when the reader's CPU is idle (an inter-processor interrupt, dear in a VM),
so it is the kernel time that two proxies making the same system calls need not share.

Needs `perf` (Debian's linux-perf) and the right to profile the process (root, or
kernel.perf_event_paranoid <= 1 for one's own processes).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

WAKE_SYMBOL = "sock_def_readable"
_ROW = re.compile(r"^\s*([\d.]+)%\s+(?:([\d.]+)%\s+)?(.+?)\s*$")


def available() -> str | None:
    """None when perf can record here; else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: linux-perf)"
    probe = subprocess.run(["perf", "record", "-q", "-o", "/dev/null", "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"perf cannot record here: {(probe.stderr or probe.stdout).strip()[:200]}"
    return None


class Recording:
    """`perf record -g` on `pid` for `seconds` (started now, in the background)."""

    def __init__(self, pid: int, seconds: float, path: Path, frequency: int = 999) -> None:
        self.path = path
        self.proc = subprocess.Popen(["perf", "record", "-q", "-F", str(frequency), "-g", "-p", str(pid),
                                      "-o", str(path), "--", "sleep", f"{max(0.5, seconds):.1f}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait(self, timeout: float = 30.0) -> bool:
        """True when the profile was written."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False
        return self.proc.returncode == 0 and self.path.exists()


def _report(path: Path, *args: str) -> list[tuple[float, float | None, str]]:
    out = subprocess.run(["perf", "report", "-i", str(path), "--stdio", "-g", "none", *args],
                         capture_output=True, text=True, timeout=120).stdout
    return parse_rows(out)


def parse_rows(text: str) -> list[tuple[float, float | None, str]]:
    """The rows of a `perf report --stdio -g none` listing: (first %, second % or None, the rest)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = _ROW.match(line)
        if m:
            rows.append((float(m.group(1)), float(m.group(2)) if m.group(2) else None, m.group(3)))
    return rows


def parse_dso(rows: list[tuple[float, float | None, str]]) -> dict[str, float]:
    """Shares (0-1) per shared object, from `perf report --no-children --sort dso` rows; the
    kernel is `kernel`, a Python extension is named by its module (`parser`, `loop`, ...)."""
    shares: dict[str, float] = {}
    for pct, _, name in rows:
        name = "kernel" if name.startswith("[kernel") else name.split(".cpython-")[0].split(".so")[0]
        shares[name] = shares.get(name, 0.0) + pct / 100.0
    return shares


def parse_wakeups(rows: list[tuple[float, float | None, str]]) -> float:
    """The share (0-1) of samples in `sock_def_readable` and its callees, from `perf report
    --children --sort sym` rows (children %, self %, symbol)."""
    for children, _, sym in rows:
        if sym.split()[-1] == WAKE_SYMBOL:
            return children / 100.0
    return 0.0


def split(path: Path) -> dict[str, object]:
    """{"dso": {name: share}, "wakeups": share} of the profile at `path`."""
    return {"dso": parse_dso(_report(path, "--no-children", "--sort", "dso")),
            "wakeups": parse_wakeups(_report(path, "--children", "--sort", "sym"))}

"""Cleaning up after a topology: its processes, namespaces and UAPI sockets, even after a crash.

A `Topology` writes what it creates to a state record (`<state_dir>/<prefix>.json`) before
creating it. `teardown_state` removes everything a record names or that carries its prefix: it
kills every process inside the namespaces and the recorded ones (`kill_all`: SIGTERM, then
SIGKILL; a process is named by PID and start time, `proc_start_time`, so a reused PID is never
hit), deletes the namespaces, removes stale WireGuard UAPI sockets and any host link that leaked.
`sweep()` does the same for the records whose owner process died (or for all, or only some
prefixes) — robust after a crash; `leftovers()` says what still exists with a prefix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from geomesh.lab.netns.namespace import NETNS_DIR, NetnsError, list_namespaces, namespace_pids, run_ip
from geomesh.logs import event

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/geomesh-netns")
WG_SOCKET_DIR = Path("/var/run/wireguard")
PREFIX_RE = re.compile(r"^gm[a-z0-9]{4}$")


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (identifies it across PID reuse)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie is gone for our purposes
    return int(fields[19])


def _alive(pid: int, start: int | None = None) -> bool:
    now = proc_start_time(pid)
    return now is not None and (start is None or now == start)


def kill_all(pids: Iterable[tuple[int, int | None]], grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace`, then SIGKILL whatever is left (never ourselves)."""
    targets = [(p, s) for p, s in pids if p != os.getpid() and _alive(p, s)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in targets:
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            targets = [(p, s) for p, s in targets if _alive(p, s)]
            if not targets:
                return
            time.sleep(0.02)


def _host_links() -> list[str]:
    return [p.name for p in Path("/sys/class/net").iterdir()] if Path("/sys/class/net").exists() else []


def leftovers(prefix: str) -> dict[str, list[Any]]:
    """What still exists with this prefix: namespaces, UAPI sockets, host-namespace links."""
    return {
        "namespaces": [n for n in list_namespaces() if n.startswith(prefix + "-")],
        "sockets": sorted(p.name for p in WG_SOCKET_DIR.glob(f"{prefix}*.sock")) if WG_SOCKET_DIR.exists() else [],
        "links": [n for n in _host_links() if n.startswith(prefix)],
    }


def teardown_state(state: dict[str, Any], reap: Callable[[], None] = lambda: None) -> None:
    """Remove what the record `state` names or its prefix marks; `reap` runs once the processes are killed."""
    prefix = state["prefix"]
    if not PREFIX_RE.match(prefix):
        raise NetnsError(f"refusing to tear down a record with prefix {prefix!r}")
    names = set(state.get("namespaces", ())) | {n for n in list_namespaces() if n.startswith(prefix + "-")}
    existing = [n for n in names if (NETNS_DIR / n).exists()]
    targets: list[tuple[int, int | None]] = [(p["pid"], p.get("start")) for p in state.get("processes", ())]
    for ns in existing:
        targets += [(pid, proc_start_time(pid)) for pid in namespace_pids(ns)]
    kill_all(targets)
    reap()
    for ns in existing:
        run_ip("netns", "del", ns, check=False)
    for link in _host_links():  # nothing is ever created here; clean up if something leaked
        if link.startswith(prefix):
            run_ip("link", "del", link, check=False)
    sockets = {WG_SOCKET_DIR / f"{n}.sock" for n in state.get("ifnames", ())}
    if WG_SOCKET_DIR.exists():
        sockets |= set(WG_SOCKET_DIR.glob(f"{prefix}*.sock"))
    for sock in sockets:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # its wireguard-go was killed above
    event(log, "netns topology removed", prefix=prefix, namespaces=sorted(existing))


def sweep(state_dir: Path = DEFAULT_STATE_DIR, *, include_live_owners: bool = False,
          prefixes: Iterable[str] | None = None) -> list[str]:
    """Tear down every recorded topology whose owner process is gone (or all, if asked), only
    those of `prefixes` when given. Returns the prefixes removed. Call it at the start of a test
    session or the lab."""
    removed: list[str] = []
    only = None if prefixes is None else set(prefixes)
    if not Path(state_dir).exists():
        return removed
    for path in sorted(Path(state_dir).glob("*.json")):
        if only is not None and path.stem not in only:
            continue
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not include_live_owners and _alive(state.get("owner_pid", -1), state.get("owner_start")):
            continue
        teardown_state(state)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed.append(state["prefix"])
    return removed

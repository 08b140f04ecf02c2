"""The faults the lab injects, as the exact commands a person types while the lab runs.

Each builder is pure: names and addresses in, argv lists out, so the walkthrough, the
end-to-end tests and `bench/failover.py` run and print the very same commands:

- a gateway's public link cut (`ip link set eth0 down` inside its namespace; its coordinator
  session stays up, it talks to the coordinator over a unix socket) and restored (link up, and
  the default route again: Linux drops a link's IPv4 routes when the link goes down);
- a region's probers cut off from the other regions: a blackhole route to every other gateway's
  public address, inside that region's gateway namespaces only (removed the same way);
- a gateway silenced (`kill -STOP`, then `-CONT`) or crashed (`kill -9`).

`time_until` measures how long an effect takes, polling a check at a fixed cadence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


def in_namespace(namespace: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def link_commands(namespace: str, ifname: str, *, up: bool, router: str) -> list[list[str]]:
    """Cut (`up=False`) or restore a host's public link."""
    if not up:
        return [in_namespace(namespace, ["ip", "link", "set", ifname, "down"])]
    return [in_namespace(namespace, ["ip", "link", "set", ifname, "up"]),
            in_namespace(namespace, ["ip", "route", "replace", "default", "via", router, "dev", ifname])]


def blackhole_commands(namespace: str, addresses: Iterable[str], *, add: bool) -> list[list[str]]:
    """Blackhole routes (add or delete) to `addresses` inside one namespace."""
    verb = "replace" if add else "del"
    return [in_namespace(namespace, ["ip", "route", verb, "blackhole", f"{a}/32"]) for a in sorted(addresses)]


def signal_command(pid: int, signal_name: str) -> list[str]:
    """`kill -<SIG> <pid>` (STOP, CONT, KILL)."""
    return ["kill", f"-{signal_name}", str(pid)]


def time_until(check: Callable[[], bool], timeout: float, *, every: float = 0.05,
               start: float | None = None) -> float | None:
    """Seconds from `start` (monotonic; default now) until `check()` first holds, trying every
    `every` seconds; None when it did not hold within `timeout` seconds of `start`."""
    t0 = time.monotonic() if start is None else start
    while True:
        tried = time.monotonic()
        if check():
            return time.monotonic() - t0
        if tried - t0 >= timeout:
            return None
        time.sleep(max(0.0, every - (time.monotonic() - tried)))

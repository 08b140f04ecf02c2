"""Network namespaces the lab and the tests run things in: entering one, and its handle.

A `Namespace` (one of a `Topology`'s) runs commands and processes inside itself (`run`, `popen`,
both via `ip netns exec`, which execs in place so PIDs are the real ones), opens sockets inside
itself from this process (`socket`, by setns on a short-lived thread: `in_netns`), and can relay
TCP between its loopback and the host's (`forward_tcp`, `expose_tcp`, with `tcp_forward.py`),
e.g. so an agent in a namespace reaches a coordinator on the host's 127.0.0.1. A `Host` is a
namespace on the topology's internet: `eth0` with a public address and a default route to the
internet namespace. The low-level `ip` calls the other modules of this package share
(`list_namespaces`, `namespace_pids`) live here too.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from geomesh.errors import GeomeshError
from geomesh.lab.netns.tcp_forward import TcpForward, listening_socket

if TYPE_CHECKING:
    from geomesh.lab.netns.topology import Topology

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class NetnsError(GeomeshError):
    """A namespace operation failed (the message includes the command and its stderr)."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (for a pytest skip), or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    return None


# --- low level --------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def in_netns(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) on a fresh thread that entered network namespace `name`.

    Network namespaces are per thread, so the caller's threads are never moved; sockets created
    by fn stay in that namespace for their whole life."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_ip(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`ip <args>` in the host's namespace, bounded by `timeout`; NetnsError if it fails and `check`."""
    argv = ["ip", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def namespace_pids(name: str) -> list[int]:
    proc = run_ip("netns", "pids", name, check=False)
    return sorted(int(x) for x in proc.stdout.split() if x.isdigit())


# --- namespaces -------------------------------------------------------------------------------


class Namespace:
    """A named network namespace that belongs to a Topology."""

    def __init__(self, topology: Topology, name: str) -> None:
        self.topology = topology
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this namespace (for callers that spawn it themselves)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait (bounded by `timeout`)."""
        proc = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise NetnsError(f"[{self.name}] `{' '.join(argv)}` failed ({proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace; teardown stops it. Popen's PID is the process's."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self.topology._record_process(proc)
        return proc

    def ping(self, address: str, *, count: int = 1, wait: float = 1.0) -> bool:
        """One bounded ping from inside the namespace; True if answered."""
        proc = subprocess.run(self.argv(["ping", "-n", "-q", "-c", str(count), "-W", str(max(1, round(wait))),
                                         address]), capture_output=True, timeout=count * wait + 10)
        return proc.returncode == 0

    def pids(self) -> list[int]:
        return namespace_pids(self.name)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on a thread inside this namespace (sockets it opens stay inside)."""
        return in_netns(self.name, fn, *args, **kwargs)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return self.call(socket.socket, family, type)

    def iproute(self) -> Any:
        from pyroute2 import IPRoute

        return IPRoute(netns=self.name)

    def forward_tcp(self, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0)) -> TcpForward:
        """Listen inside this namespace and relay to `target` in the host's namespace (e.g. its
        127.0.0.1). `.port` is the port to use inside the namespace."""
        listener = self.call(listening_socket, *listen)
        fwd = TcpForward(listener, lambda: socket.create_connection(target, timeout=5))
        self.topology._forwards.append(fwd)
        return fwd

    def expose_tcp(self, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0)) -> TcpForward:
        """Listen in the host's namespace (default 127.0.0.1, any port) and relay to `target`
        inside this namespace: how a host-side client reaches a server in the namespace."""
        fwd = TcpForward(listening_socket(*listen), lambda: self.call(socket.create_connection, target, 5))
        self.topology._forwards.append(fwd)
        return fwd


class Host(Namespace):
    """A host namespace on the internet: eth0 with `public_ip` in `network`, default route via `router`."""

    def __init__(self, topology: Topology, name: str, short: str, public_ip: str,
                 network: ipaddress.IPv4Network, router: str, port: str) -> None:
        super().__init__(topology, name)
        self.short = short
        self.public_ip = public_ip
        self.network = network
        self.router = router
        self.internet_port = port  # the veth end on the internet bridge

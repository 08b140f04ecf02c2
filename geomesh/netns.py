"""Network-namespace topologies for the tests and the lab: an "internet" and hosts joined to it.

`Topology` builds, on one machine, what the mesh needs to be real: an `internet` namespace
holding one bridge per public network (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, router
address .1, forwarding between them), and hosts — each its own namespace, with `eth0` (a veth
whose other end sits on the bridge), a public address and a default route to the internet
namespace. Nothing is added to the host's own namespace: every address lives inside a namespace
this module created. A `Namespace` runs commands and processes inside itself (`run`, `popen`,
both via `ip netns exec`, which execs in place so PIDs are the real ones), opens sockets inside
itself from this process (`socket`, by setns on a short-lived thread), and can relay TCP
between its loopback and the host's (`forward_tcp`, `expose_tcp`), e.g. so an agent in a
namespace reaches a coordinator on the host's 127.0.0.1.

Everything created carries the topology's random prefix (namespaces `<prefix>-<name>`,
WireGuard interface names from `ifname()`, unique on the host because UAPI sockets are global)
and is written to a state record *before* it is created. `teardown()` kills every process inside
the namespaces (and the recorded ones), deletes the namespaces, removes stale UAPI sockets and
the record; `sweep()` does the same for records whose owner process died — robust after a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from geomesh.errors import GeomeshError, ValidationError
from geomesh.logs import event

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/geomesh-netns")
NETNS_DIR = Path("/var/run/netns")
WG_SOCKET_DIR = Path("/var/run/wireguard")
PUBLIC_NETWORKS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
CLONE_NEWNET = 0x40000000
PREFIX_RE = re.compile(r"^gm[a-z0-9]{4}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
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


def _ip(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
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
    proc = _ip("netns", "pids", name, check=False)
    return sorted(int(x) for x in proc.stdout.split() if x.isdigit())


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


def _kill_all(pids: Iterable[tuple[int, int | None]], grace: float = 3.0) -> None:
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


# --- TCP relay --------------------------------------------------------------------------------


class TcpForward:
    """Accepts on `listener` and relays each connection to `target` (opened by `connect`).

    Threads, not asyncio, so it works whatever event loop the caller runs (or none); at most
    `max_connections` at once, further ones are closed at once."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket],
                 max_connections: int = 64) -> None:
        self.listener = listener
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._connect = connect
        self._max = max_connections
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"fwd-{self.address[1]}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or len(self._socks) >= 2 * self._max:
                    conn.close()
                    continue
                self._socks.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = self._connect()
        except OSError as e:
            event(log, "tcp forward: upstream connect failed", logging.WARNING, port=self.port, error=str(e))
            self._drop(conn)
            return
        with self._lock:
            self._socks.add(upstream)
        done = threading.Event()
        threading.Thread(target=self._pump, args=(upstream, conn, done), daemon=True).start()
        self._pump(conn, upstream, done)

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if done.is_set():  # the other direction finished first: both are done
            self._drop(src)
            self._drop(dst)
        else:
            done.set()

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(timeout=2)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


# --- namespaces and the topology -------------------------------------------------------------


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
        listener = self.call(_listen, *listen)
        fwd = TcpForward(listener, lambda: socket.create_connection(target, timeout=5))
        self.topology._forwards.append(fwd)
        return fwd

    def expose_tcp(self, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0)) -> TcpForward:
        """Listen in the host's namespace (default 127.0.0.1, any port) and relay to `target`
        inside this namespace: how a host-side client reaches a server in the namespace."""
        fwd = TcpForward(_listen(*listen), lambda: self.call(socket.create_connection, target, 5))
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


class Topology:
    """An internet namespace and hosts; use as a context manager, or call start()/teardown()."""

    def __init__(self, *, prefix: str | None = None, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.state_dir = Path(state_dir)
        self.prefix = prefix or self._fresh_prefix()
        if not PREFIX_RE.match(self.prefix):
            raise ValidationError("prefix", f"{self.prefix!r} is not 'gm' + 4 of [a-z0-9]")
        self.internet = Namespace(self, f"{self.prefix}-inet")
        self.hosts: dict[str, Host] = {}
        self._bridges: dict[str, str] = {}  # network -> bridge name in the internet namespace
        self._next_addr: dict[str, int] = {}
        self._port_seq = 0
        self._ifname_seq = 0
        self._state: dict[str, Any] = {
            "prefix": self.prefix, "owner_pid": os.getpid(), "owner_start": proc_start_time(os.getpid()),
            "created": time.time(), "namespaces": [], "ifnames": [], "processes": [],
        }
        self._procs: list[subprocess.Popen[Any]] = []
        self._forwards: list[TcpForward] = []
        self._started = False

    def _fresh_prefix(self) -> str:
        taken = {n.split("-")[0] for n in list_namespaces()}
        if self.state_dir.exists():
            taken |= {p.stem for p in self.state_dir.glob("*.json")}
        while True:
            prefix = "gm" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(4))
            if prefix not in taken:
                return prefix

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.prefix}.json"

    def _save(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=1))
        os.replace(tmp, self.state_file)

    def _record_process(self, proc: subprocess.Popen[Any]) -> None:
        self._procs.append(proc)
        self._state["processes"].append({"pid": proc.pid, "start": proc_start_time(proc.pid)})
        self._save()

    def _add_namespace(self, name: str) -> None:
        self._state["namespaces"].append(name)
        self._save()  # recorded before it exists: a crash right after still gets it cleaned
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")

    def ifname(self, tag: str = "wg") -> str:
        """A WireGuard interface name unique on this host (≤ 15 characters), recorded for cleanup."""
        self._ifname_seq += 1
        name = f"{self.prefix}{tag}{self._ifname_seq}"
        if len(name) > 15 or not re.match(r"^[a-z0-9]+$", tag):
            raise ValidationError("tag", f"{tag!r} gives interface name {name!r}: use ≤ {15 - len(self.prefix) - 3} "
                                         "of [a-z0-9]")
        self._state["ifnames"].append(name)
        self._save()
        return name

    # --- building ---

    def start(self) -> Topology:
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        if self._started:
            return self
        self._started = True
        self._save()
        self._add_namespace(self.internet.name)
        self.internet.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        event(log, "netns topology started", prefix=self.prefix, state=str(self.state_file))
        return self

    def __enter__(self) -> Topology:
        try:
            return self.start()
        except BaseException:
            self.teardown()
            raise

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _bridge(self, network: ipaddress.IPv4Network) -> tuple[str, str]:
        key = str(network)
        router = str(network.network_address + 1)
        if key not in self._bridges:
            name = f"br{len(self._bridges)}"
            inet = self.internet.name
            _ip("-n", inet, "link", "add", name, "type", "bridge")
            _ip("-n", inet, "addr", "add", f"{router}/{network.prefixlen}", "dev", name)
            _ip("-n", inet, "link", "set", name, "up")
            self._bridges[key] = name
            self._next_addr[key] = 10
        return self._bridges[key], router

    def add_host(self, name: str, *, network: str = PUBLIC_NETWORKS[0], address: str | None = None) -> Host:
        """A new host namespace `<prefix>-<name>` on `network`, at `address` or the next free one (.10, .11, ...)."""
        if not self._started:
            raise NetnsError("start() the topology first")
        if not NAME_RE.match(name) or name == "inet":
            raise ValidationError("name", f"{name!r}: use 1-20 of [a-z0-9-], not 'inet'")
        if name in self.hosts:
            raise ValidationError("name", f"host {name!r} exists already")
        net = ipaddress.ip_network(network)
        if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 29:
            raise ValidationError("network", f"{network!r} must be an IPv4 network of at least /29")
        bridge, router = self._bridge(net)
        used = {h.public_ip for h in self.hosts.values()}
        if address is None:
            while str(net.network_address + self._next_addr[str(net)]) in used:
                self._next_addr[str(net)] += 1
            ip = net.network_address + self._next_addr[str(net)]
            self._next_addr[str(net)] += 1
        else:
            ip = ipaddress.ip_address(address)
        if ip not in net or ip in (net.network_address, net.broadcast_address, net.network_address + 1) \
                or str(ip) in used:
            raise ValidationError("address", f"{ip} is not a free host address in {net}")
        ns = f"{self.prefix}-{name}"
        self._port_seq += 1
        port = f"h{self._port_seq}"
        self._add_namespace(ns)
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.internet.name)
        _ip("-n", self.internet.name, "link", "set", port, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", router)
        host = Host(self, ns, name, str(ip), net, router, port)
        self.hosts[name] = host
        event(log, "netns host added", host=ns, address=str(ip), network=str(net))
        return host

    def remove_host(self, name: str) -> None:
        """Stop the host's processes and delete its namespace (and with it its veth)."""
        host = self.hosts.pop(name)
        _kill_all((p, proc_start_time(p)) for p in host.pids())
        self._reap()
        _ip("netns", "del", host.name, check=False)

    # --- teardown ---

    def _reap(self) -> None:
        for proc in self._procs:
            proc.poll()

    def teardown(self) -> None:
        """Remove everything this topology created; safe to call twice, and after a failure."""
        for fwd in self._forwards:
            fwd.close()
        self._forwards.clear()
        _teardown_state(self._state, reap=self._reap)
        self.hosts.clear()
        self._bridges.clear()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self._started = False


def _teardown_state(state: dict[str, Any], reap: Callable[[], None] = lambda: None) -> None:
    prefix = state["prefix"]
    if not PREFIX_RE.match(prefix):
        raise NetnsError(f"refusing to tear down a record with prefix {prefix!r}")
    names = set(state.get("namespaces", ())) | {n for n in list_namespaces() if n.startswith(prefix + "-")}
    existing = [n for n in names if (NETNS_DIR / n).exists()]
    targets: list[tuple[int, int | None]] = [(p["pid"], p.get("start")) for p in state.get("processes", ())]
    for ns in existing:
        targets += [(pid, proc_start_time(pid)) for pid in namespace_pids(ns)]
    _kill_all(targets)
    reap()
    for ns in existing:
        _ip("netns", "del", ns, check=False)
    for link in _host_links():  # nothing is ever created here; clean up if something leaked
        if link.startswith(prefix):
            _ip("link", "del", link, check=False)
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
        _teardown_state(state)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed.append(state["prefix"])
    return removed

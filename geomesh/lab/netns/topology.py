"""Network-namespace topologies for the tests and the lab: an "internet" and hosts joined to it.

`Topology` builds, on one machine, what the mesh needs to be real: an `internet` namespace
holding one bridge per public network (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, router
address .1, forwarding between them), and hosts (`Host`, see `namespace.py`) — each its own
namespace, with `eth0` (a veth whose other end sits on the bridge), a public address and a
default route to the internet namespace. Nothing is added to the host's own namespace: every
address lives inside a namespace this package created.

Everything created carries the topology's random prefix (namespaces `<prefix>-<name>`,
WireGuard interface names from `ifname()`, unique on the host because UAPI sockets are global)
and is written to a state record *before* it is created. `teardown()` removes it all (with
`cleanup.py`, which also sweeps the records of crashed owners).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import string
import subprocess
import time
from pathlib import Path
from typing import Any

from geomesh.errors import ValidationError
from geomesh.lab.netns.cleanup import DEFAULT_STATE_DIR, PREFIX_RE, kill_all, proc_start_time, teardown_state
from geomesh.lab.netns.namespace import (
    Host,
    Namespace,
    NetnsError,
    list_namespaces,
    run_ip,
    unavailable_reason,
)
from geomesh.lab.netns.tcp_forward import TcpForward
from geomesh.logs import event

log = logging.getLogger(__name__)

PUBLIC_NETWORKS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")


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
        run_ip("netns", "add", name)
        run_ip("-n", name, "link", "set", "lo", "up")

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
            run_ip("-n", inet, "link", "add", name, "type", "bridge")
            run_ip("-n", inet, "addr", "add", f"{router}/{network.prefixlen}", "dev", name)
            run_ip("-n", inet, "link", "set", name, "up")
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
        run_ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.internet.name)
        run_ip("-n", self.internet.name, "link", "set", port, "master", bridge, "up")
        run_ip("-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", "eth0")
        run_ip("-n", ns, "link", "set", "eth0", "up")
        run_ip("-n", ns, "route", "add", "default", "via", router)
        host = Host(self, ns, name, str(ip), net, router, port)
        self.hosts[name] = host
        event(log, "netns host added", host=ns, address=str(ip), network=str(net))
        return host

    def remove_host(self, name: str) -> None:
        """Stop the host's processes and delete its namespace (and with it its veth)."""
        host = self.hosts.pop(name)
        kill_all((p, proc_start_time(p)) for p in host.pids())
        self._reap()
        run_ip("netns", "del", host.name, check=False)

    # --- teardown ---

    def _reap(self) -> None:
        for proc in self._procs:
            proc.poll()

    def teardown(self) -> None:
        """Remove everything this topology created; safe to call twice, and after a failure."""
        for fwd in self._forwards:
            fwd.close()
        self._forwards.clear()
        teardown_state(self._state, reap=self._reap)
        self.hosts.clear()
        self._bridges.clear()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self._started = False

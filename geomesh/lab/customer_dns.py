"""Real DNS for custom domains, for the tests and the lab: an authoritative gdnsd for the
customers' zones and an unbound recursive resolver that reaches it, stopped by PID.

`Gdnsd(directory, zones)` serves each zone text (`{"customer.example": "<zone file>"}`) from a
config directory it writes (as bench/_dns_workload.py does for the DNS benchmark); `set_zone`
rewrites one and has the running server reload it (`gdnsdctl reload-zones`, `reload_argv()` is
that command). `Unbound(directory, stubs)` is a recursive resolver whose only knowledge is
`stub-zone`s pointing each zone at its authority (no root hints needed; the zones in `tcp_stubs`
are asked over TCP, e.g. through a TCP relay into a network namespace), caching at most
`cache_max_ttl` seconds (negative answers too), answering the networks in `allow`, and logging
every query it receives (`log-queries`) so a test can count what a client asked
(`queries(name)`). Both listen on 127.0.0.1 and a free port unless given `listen` and `port`;
given `netns` (a `geomesh.lab.netns.Namespace`) they run inside that namespace, where the lab's
gateways reach them. No pytest here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from dnslib import DNSRecord

from geomesh.lab.netns import Namespace

START_DEADLINE = 20.0  # seconds for a server to answer after it is started


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def ask(server: tuple[str, int], name: str, qtype: str = "TXT", timeout: float = 1.0) -> DNSRecord | None:
    """One UDP query; the parsed reply, or None on timeout."""
    q = DNSRecord.question(name, qtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q.pack(), server)
        try:
            data, _ = s.recvfrom(65535)
        except (TimeoutError, OSError):
            return None
    return DNSRecord.parse(data)


class _Daemon:
    name = "daemon"

    def __init__(self, directory: Path, *, listen: str = "127.0.0.1", port: int | None = None,
                 netns: Namespace | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.listen = listen
        self.netns = netns
        self.port = port or (netns.call(free_port, listen) if netns is not None else free_port(listen))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / f"{self.name}.out"

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen, self.port)

    def ask(self, name: str, qtype: str = "TXT", timeout: float = 1.0) -> DNSRecord | None:
        """One UDP query to this server, sent from where it runs (inside its namespace if any)."""
        if self.netns is not None:
            return self.netns.call(ask, self.address, name, qtype, timeout)
        return ask(self.address, name, qtype, timeout)

    def _spawn(self, cmd: list[str], probe: str) -> None:
        exe = shutil.which(cmd[0]) or shutil.which(cmd[0], path="/usr/sbin:/sbin")
        if exe is None:
            raise RuntimeError(f"{cmd[0]} is not installed")
        argv = [exe, *cmd[1:]]
        if self.netns is not None:
            argv = self.netns.argv(argv)  # `ip netns exec` execs in place: the PID is the server's
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()[-2000:]}")
            reply = self.ask(probe, "SOA", timeout=0.2)
            if reply is not None:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {START_DEADLINE:g}s: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process this object started (SIGKILL after 5 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Gdnsd(_Daemon):
    """gdnsd, authoritative for `zones` (name -> zone file text) on <listen>:<port>."""

    name = "gdnsd"

    def __init__(self, directory: Path, zones: dict[str, str], *, listen: str = "127.0.0.1",
                 port: int | None = None, netns: Namespace | None = None) -> None:
        super().__init__(directory, listen=listen, port=port, netns=netns)
        (self.dir / "zones").mkdir(exist_ok=True)
        for sub in ("run", "state"):
            (self.dir / sub).mkdir(exist_ok=True)
        (self.dir / "config").write_text(
            f"options => {{ listen => [ {listen} ], dns_port => {self.port}, run_dir => {self.dir}/run,\n"
            f"  state_dir => {self.dir}/state, udp_threads => 1, tcp_threads => 1 }}\n")
        for zone, text in zones.items():
            (self.dir / "zones" / zone).write_text(text)
        self._spawn(["gdnsd", "-c", str(self.dir), "start"], next(iter(zones)))

    def zone_path(self, zone: str) -> Path:
        return self.dir / "zones" / zone

    def reload_argv(self) -> list[str]:
        """The command that has the running server load its zone files again."""
        return [shutil.which("gdnsdctl") or "gdnsdctl", "-c", str(self.dir), "-t", "10", "reload-zones"]

    def set_zone(self, zone: str, text: str) -> None:
        """Replace a zone's file and have the running server load it (returns once it did)."""
        self.zone_path(zone).write_text(text)
        done = subprocess.run(self.reload_argv(), capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            raise RuntimeError(f"gdnsdctl reload-zones failed: {done.stderr.strip()}")


class Unbound(_Daemon):
    """unbound on <listen>:<port>, resolving only the `stubs` zones (zone -> authority address)."""

    name = "unbound"

    def __init__(self, directory: Path, stubs: dict[str, tuple[str, int]], cache_max_ttl: int = 1, *,
                 tcp_stubs: tuple[str, ...] = (), allow: tuple[str, ...] = ("127.0.0.0/8",),
                 listen: str = "127.0.0.1", port: int | None = None, netns: Namespace | None = None) -> None:
        super().__init__(directory, listen=listen, port=port, netns=netns)
        self.query_log = self.dir / "unbound.log"
        lines = [
            "server:",
            f"  interface: {listen}", f"  port: {self.port}", "  do-ip6: no", "  num-threads: 1",
            *(f"  access-control: {net} allow" for net in allow), "  do-not-query-localhost: no",
            '  chroot: ""', '  username: ""', f'  directory: "{self.dir}"',
            f'  pidfile: "{self.dir}/unbound.pid"', f'  logfile: "{self.query_log}"', "  use-syslog: no",
            "  log-queries: yes", "  verbosity: 0", '  module-config: "iterator"', "  qname-minimisation: no",
            f"  cache-max-ttl: {cache_max_ttl}", f"  cache-max-negative-ttl: {cache_max_ttl}",
            "  prefetch: no", "  serve-expired: no",
        ]
        for zone in stubs:
            lines += [f'  local-zone: "{zone}." transparent', f'  domain-insecure: "{zone}."']
        lines += ["remote-control:", "  control-enable: no"]
        for zone, (host, port) in stubs.items():
            lines += ["stub-zone:", f'  name: "{zone}."', f"  stub-addr: {host}@{port}"]
            if zone in tcp_stubs:
                lines.append("  stub-tcp-upstream: yes")
        (self.dir / "unbound.conf").write_text("\n".join(lines) + "\n")
        self._spawn(["unbound", "-d", "-c", str(self.dir / "unbound.conf")], next(iter(stubs)))

    def queries(self, name: str, qtype: str = "TXT") -> int:
        """How many queries for `name` (case ignored, no trailing dot needed) of `qtype` it received."""
        want = f" {name.rstrip('.').lower()}. {qtype} IN"
        try:
            text = self.query_log.read_text(errors="replace").lower()
        except OSError:
            return 0
        return text.count(want.lower())

"""The static-stability rig of the fault benchmark (bench/faults.py, issue 14): a small real
topology on loopback (etcd, a coordinator, a gateway agent and a backend per region, two
geomesh-dns following the coordinator with --state-dir), the load that checks every region's DNS
answer and HTTP through every gateway, and the faults a scenario injects into it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench._procs import CoordinatorProc
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.lab.processes import EtcdProcess, ServiceProcess, free_port
from geomesh.pki import Pki

if TYPE_CHECKING:
    from bench.faults import Settings

# -- static stability (issue 14) -------------------------------------------------------------------
#
# A small real topology on loopback: one etcd, one coordinator (fixed port, lease TTL 3 s), two
# regions each with a gateway agent process (`geomesh-gateway --config`, WireGuard off, the proxy
# on 127.0.0.1 in front of one backend per region) and two geomesh-dns processes following the
# coordinator with --state-dir. A load thread sends, every 100 ms, a DNS query for the app from a
# client of every region (ECS) to every DNS server, and an HTTP request through every gateway.
# A client's DNS answer fails when no server gives it a non-empty NOERROR (a resolver tries the
# next name server); an HTTP request fails when it is not a 200 from the backend. The process a
# scenario restarts is not counted while it is down (that gap is reported as its restart time).

STATIC_ZONE = "geo.example.com"
STATIC_APP_HOST = "shop.apps.test"
STATIC_REGIONS = {  # region: (latitude, longitude, client subnet placed there by GeoLite2, gateway public IP)
    "eu-central": (50.11, 8.68, "193.0.6.0/24", "192.0.2.21"),
    "us-east": (39.04, -77.49, "8.8.8.0/24", "192.0.2.31"),
}


class _Backend:
    """An HTTP/1.1 backend on loopback answering 200 with X-Backend: its name."""

    def __init__(self, name: str) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                body = name.encode()
                self.send_response(200)
                self.send_header("X-Backend", name)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _GatewayProc:
    """`python -m regional_gateway.main --config FILE`, ready when its proxy answers."""

    def __init__(self, work: Path, name: str, region: str, public_ip: str, coordinator: str, pki: Pki) -> None:
        ident = pki.identity("gateway", name)
        self.name, self.region, self.public_ip = name, region, public_ip
        self.port = free_port()
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "gateway.toml"
        self.config.write_text(
            f'name = "{name}"\nregion = "{region}"\ncoordinators = ["{coordinator}"]\npublic_ip = "{public_ip}"\n'
            f'zone = "apps.test"\nproxy_listen = "127.0.0.1"\nproxy_port = {self.port}\nheartbeat_interval = 0.5\n'
            f'[tls]\nca = "{ident.ca}"\ncert = "{ident.cert}"\nkey = "{ident.key}"\n'
            f'[wireguard]\nbackend = "none"\nkey_file = "{self.dir / "wg.key"}"\n')
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "gateway.log"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "regional_gateway.main", "--config", str(self.config),
                                      "--log-level", "info"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _dns_query(port: int, subnet: str, timeout: float = 1.0) -> list[str] | None:
    """The A records answered for the app to a client in `subnet`; None: no answer or not NOERROR."""
    from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord, EDNSOption

    addr, _, plen = subnet.partition("/")
    prefix = int(plen)
    ecs = struct.pack("!HBB", 1, prefix, 0) + socket.inet_aton(addr)[:(prefix + 7) // 8]
    q = DNSRecord(DNSHeader(id=random.randrange(65536)), q=DNSQuestion(f"shop.{STATIC_ZONE}", QTYPE.A))
    q.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(8, ecs)]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(bytes(q.pack()), ("127.0.0.1", port))
            reply = DNSRecord.parse(s.recv(4096))
        except OSError:
            return None
    if reply.header.rcode != 0:
        return None
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def _http_get(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {STATIC_APP_HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.startswith(b"HTTP/1.1 200") and b"x-backend: shop-" in data.lower()
    except OSError:
        return False


@dataclass
class _Load:
    """The steady client load of the static-stability scenarios (a thread; see above)."""

    dns_ports: dict[str, int]
    http_ports: dict[str, int]
    interval: float = 0.1
    excluded: set[str] = field(default_factory=set)  # processes being restarted: not counted
    dns_total: int = 0
    dns_failed: int = 0
    http_total: int = 0
    http_failed: int = 0
    dns_max_s: float = 0.0
    http_max_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    stop_at: float = 0.0

    def run(self, until: float) -> None:
        while time.monotonic() < until and (not self.stop_at or time.monotonic() < self.stop_at):
            started = time.monotonic()
            for region, (_lat, _lon, subnet, _ip) in STATIC_REGIONS.items():
                ok = False
                servers = [n for n in self.dns_ports if n not in self.excluded]
                for name in servers:
                    t0 = time.monotonic()
                    answer = _dns_query(self.dns_ports[name], subnet)
                    if answer:
                        self.dns_max_s = max(self.dns_max_s, time.monotonic() - t0)
                        ok = True
                        break
                if not ok and any(n in self.excluded for n in servers):
                    continue  # a server stopped while asked: the resolver's retry is the next round
                self.dns_total += 1
                if not ok:
                    self.dns_failed += 1
                    self.failures.append(f"{time.monotonic():.1f} dns {region}")
            for name, port in self.http_ports.items():
                if name in self.excluded:
                    continue
                t0 = time.monotonic()
                good = _http_get(port)
                if name in self.excluded:
                    continue  # stopped while this request was in flight: the restart gap, not counted
                self.http_total += 1
                if good:
                    self.http_max_s = max(self.http_max_s, time.monotonic() - t0)
                else:
                    self.http_failed += 1
                    self.failures.append(f"{time.monotonic():.1f} http {name}")
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))


class Topology:
    """etcd, a coordinator, two gateway agents, two geomesh-dns (see the section's comment)."""

    def __init__(self, s: Settings, name: str, *, lease_ttl: int = 3, dns_ttl: int = 30) -> None:
        self.work = s.work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.pki = s.pki
        self.etcd = EtcdProcess(self.work / "etcd", log_path=self.work / "etcd.log")
        self.coordinator_port = free_port()
        self.lease_ttl = lease_ttl
        self.dns_ttl = dns_ttl
        self.coordinator: CoordinatorProc | None = None
        self.backends: dict[str, _Backend] = {}
        self.gateways: dict[str, _GatewayProc] = {}
        self.dns: dict[str, ServiceProcess] = {}

    @property
    def coordinator_address(self) -> str:
        return f"127.0.0.1:{self.coordinator_port}"

    def start_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.start()

    async def start(self) -> None:
        self.etcd.start()
        self.coordinator = CoordinatorProc(self.etcd, self.pki, self.work / "coordinator", lease_ttl=self.lease_ttl,
                                           extra=["--listen", self.coordinator_address,
                                                  "--allow-loopback-instances"])
        self.coordinator.start()
        ch = client_channel(self.coordinator_address, self.pki.identity("admin", "bench"))
        admin = pbg.AdminStub(ch)
        await admin.CreateApp(pb.App(name="shop"))
        for i, (region, (lat, lon, _subnet, ip)) in enumerate(STATIC_REGIONS.items()):
            await admin.CreateRegion(pb.Region(name=region, latitude=lat, longitude=lon))
            self.backends[region] = _Backend(f"shop-{region}")
            await admin.AddInstance(pb.Instance(app="shop", id=f"s{i}", region=region, address="127.0.0.1",
                                                port=self.backends[region].port))
            name = f"gw-{region}"
            await admin.EnrollGateway(pb.Enrollment(name=name, region=region, public_ips=[ip]))
            self.gateways[name] = _GatewayProc(self.work, name, region, ip, self.coordinator_address, self.pki)
        await ch.close()
        for gw in self.gateways.values():
            gw.start()
        for i in (1, 2):
            self.dns[f"dns-{i}"] = self._dns(f"dns-{i}")
            self.dns[f"dns-{i}"].start()
        await asyncio.to_thread(self.wait_serving, 60.0)

    def _dns(self, name: str) -> ServiceProcess:
        ident = self.pki.identity("dns", name)
        return ServiceProcess("geodns.main", [
            "--listen", "127.0.0.1:0", "--coordinator", self.coordinator_address, "--zone", STATIC_ZONE,
            "--ns", "ns1=192.0.2.53", "--tls-ca", str(ident.ca), "--tls-cert", str(ident.cert),
            "--tls-key", str(ident.key), "--state-dir", str(self.work / name / "state"), "--no-region-map",
            "--ttl", str(self.dns_ttl), "--negative-ttl", str(self.dns_ttl), "--name", name],
            self.work / name, name=name)

    def restart_dns(self, name: str) -> None:
        """Stop and start one DNS server on the same port (a resolver has it as a name server)."""
        proc = self.dns[name]
        proc.stop()
        proc.args[proc.args.index("--listen") + 1] = f"127.0.0.1:{proc.port}"
        proc.start()

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dns_ok = all(_dns_query(p.port, subnet) for p in self.dns.values()
                         for (_a, _b, subnet, _ip) in STATIC_REGIONS.values())
            http_ok = all(_http_get(g.port) for g in self.gateways.values())
            if dns_ok and http_ok:
                return
            time.sleep(0.2)
        raise TimeoutError("the static-stability topology did not come up")

    def load(self) -> _Load:
        return _Load({n: p.port for n, p in self.dns.items()}, {n: g.port for n, g in self.gateways.items()})

    def stop(self) -> None:
        for proc in self.dns.values():
            proc.stop()
        for gw in self.gateways.values():
            gw.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        self.etcd.stop()
        for b in self.backends.values():
            b.close()


def static_fault(topo: Topology, kind: str, outage: float, load: _Load) -> dict:
    """Run one fault while `load` runs in this thread's sibling; returns what happened when."""
    notes: dict = {}
    if kind == "etcd":
        topo.etcd.kill()
        time.sleep(outage)
        topo.etcd.start()
    elif kind == "coordinator":
        assert topo.coordinator is not None
        topo.coordinator.kill()
        time.sleep(outage)
        topo.start_coordinator()
    elif kind == "both":
        assert topo.coordinator is not None
        topo.coordinator.kill()
        topo.etcd.kill()
        time.sleep(outage / 3)
        gw = next(iter(topo.gateways.values()))
        load.excluded |= {gw.name, "dns-1"}
        t0 = time.monotonic()
        gw.stop()
        gw.start()
        topo.restart_dns("dns-1")
        while not _http_get(gw.port, timeout=0.5):
            time.sleep(0.05)
            assert time.monotonic() - t0 < 60, "the restarted gateway never served"
        notes["gateway_restart_s"] = round(time.monotonic() - t0, 2)
        while not _dns_query(topo.dns["dns-1"].port, STATIC_REGIONS["eu-central"][2]):
            time.sleep(0.05)
            assert time.monotonic() - t0 < 60, "the restarted DNS server never answered"
        notes["dns_restart_s"] = round(time.monotonic() - t0, 2)
        load.excluded.clear()
        time.sleep(max(0.0, outage - outage / 3 - (time.monotonic() - t0)))
        topo.etcd.start()
        topo.start_coordinator()
    elif kind == "planned":
        assert topo.coordinator is not None
        t0 = time.monotonic()
        topo.coordinator.stop()  # SIGTERM: a planned stop
        topo.start_coordinator()
        notes["coordinator_restart_s"] = round(time.monotonic() - t0, 2)
    else:
        raise ValueError(kind)
    return notes

"""DNS clients for the geodns tests: real `dig`/`kdig` runs with their output parsed, raw UDP and
TCP exchanges, query builders, and the `DnsProcess` that runs `geomesh-dns` as a subprocess."""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGTERM

import pytest
from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord, EDNSOption

from geomesh.lab.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run scripts/install.sh (./run test does)")
    return path


# -- dig / kdig -------------------------------------------------------------------------------


@dataclass
class DigResult:
    text: str
    status: str = ""
    flags: set[str] = field(default_factory=set)
    answer: list[tuple[str, int, str, str]] = field(default_factory=list)  # (name, ttl, type, data)
    authority: list[tuple[str, int, str, str]] = field(default_factory=list)
    question: str = ""
    ecs: str | None = None  # "addr/source/scope"
    has_opt: bool = False
    edns_version: int | None = None

    def addresses(self) -> set[str]:
        return {data for _, _, rtype, data in self.answer if rtype in ("A", "AAAA")}


_RR = re.compile(r"^(\S+)\s+(\d+)\s+IN\s+(\S+)\s+(.*)$")


def parse_dig(text: str) -> DigResult:
    res = DigResult(text)
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        m = re.search(r"status: ([A-Z]+)", line)
        if m and "HEADER" in line:
            res.status = m.group(1)
        m = re.match(r";; flags: ([a-z ]*)[;,]", line, re.IGNORECASE)
        if m:
            res.flags = set(m.group(1).split())
        if "OPT PSEUDOSECTION" in line or line.startswith(";; EDNS PSEUDOSECTION"):
            res.has_opt = True
        m = re.search(r"EDNS: version: (\d+)", line) or re.match(r";; Version: (\d+);", line)
        if m:
            res.has_opt = True
            res.edns_version = int(m.group(1))
        m = re.search(r"CLIENT-SUBNET: (\S+)", line)
        if m:
            res.ecs = m.group(1)
        lowered = line.lower()
        if lowered.startswith(";; question section") or lowered.startswith(";; question"):
            section = "question"
            continue
        if lowered.startswith(";; answer section"):
            section = "answer"
            continue
        if lowered.startswith(";; authority section"):
            section = "authority"
            continue
        if lowered.startswith(";; additional section") or lowered.startswith(";; additional data"):
            section = "additional"
            continue
        if not line:
            continue
        if section == "question" and line.startswith(";"):
            res.question = line.lstrip(";").split()[0]
            continue
        if line.startswith(";"):
            continue
        m = _RR.match(line)
        if m and section in ("answer", "authority"):
            rr = (m.group(1), int(m.group(2)), m.group(3), m.group(4).strip())
            getattr(res, section).append(rr)
    return res


def _query_tool(tool: str, retries_flag: str, port: int, name: str, qtype: str, extra: tuple[str, ...], tcp: bool,
                subnet: str | None, timeout: float) -> DigResult:
    cmd = [need(tool), "@127.0.0.1", "-p", str(port), name, qtype, "+norec", f"+time={int(timeout)}", retries_flag]
    if tcp:
        cmd.append("+tcp")
    if subnet:
        cmd.append(f"+subnet={subnet}")
    cmd += list(extra)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * 3 + 5)
    return parse_dig(out.stdout)


def dig(port: int, name: str, qtype: str = "A", *extra: str, tcp: bool = False, subnet: str | None = None,
        timeout: float = 2.0) -> DigResult:
    return _query_tool("dig", "+tries=1", port, name, qtype, extra, tcp, subnet, timeout)


def kdig(port: int, name: str, qtype: str = "A", *extra: str, tcp: bool = False, subnet: str | None = None,
         timeout: float = 2.0) -> DigResult:
    return _query_tool("kdig", "+retry=0", port, name, qtype, extra, tcp, subnet, timeout)


# -- raw exchanges ----------------------------------------------------------------------------


def query(name: str, qtype: str = "A", *, ecs: str | None = None, edns: bool = True, payload: int = 1232,
          do: bool = False, qid: int = 4242, rd: bool = False) -> bytes:
    q = DNSRecord(DNSHeader(id=qid, rd=int(rd)), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns or ecs:
        opts = []
        if ecs:
            opts.append(EDNSOption(8, ecs_option(ecs)))
        q.add_ar(EDNS0(udp_len=payload, flags="do" if do else "", opts=opts))
    return bytes(q.pack())


def ecs_option(subnet: str) -> bytes:
    addr, _, plen = subnet.partition("/")
    prefix = int(plen)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    packed = socket.inet_pton(family, addr)[:(prefix + 7) // 8]
    return struct.pack("!HBB", 2 if family == socket.AF_INET6 else 1, prefix, 0) + packed


def udp_exchange(port: int, wire: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def tcp_exchange(port: int, wires: list[bytes], timeout: float = 5.0) -> list[bytes]:
    """Several queries on one TCP connection (pipelined), the replies in order."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wires))
        return [read_frame(s) for _ in wires]


def read_frame(s: socket.socket) -> bytes:
    head = recv_exact(s, 2)
    return recv_exact(s, struct.unpack("!H", head)[0])


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} octets")
        buf += chunk
    return buf


# -- the server process -----------------------------------------------------------------------


class DnsProcess(ServiceProcess):
    """`python -m geodns.main ...` on 127.0.0.1, port 0; `.port` once it serves."""

    def __init__(self, workdir: Path, *args: str) -> None:
        listen = ["--listen", "127.0.0.1:0"] if "--listen" not in args else []
        super().__init__("geodns.main", [*listen, *args], workdir, name="geodns")

    def start(self, timeout: float = 30.0) -> DnsProcess:  # type: ignore[override]
        super().start(timeout)
        return self

    def wait_map(self, builds: int = 1, timeout: float = 120.0) -> None:
        """Wait until the server logged `builds` region map builds (answers come from the map)."""
        deadline = time.monotonic() + timeout
        while self.log().count('"region map built"') < builds:
            if time.monotonic() > deadline or not self.alive():
                raise TimeoutError(f"no region map after {timeout}s: {self.log()[-2000:]}")
            time.sleep(0.2)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = SIGTERM, timeout: float = 15.0) -> int | None:
        return super().stop(sig, timeout)

"""Connection limits and file-descriptor exhaustion on the gateway's listeners.

In-process gateway: TLS connections waiting for their ClientHello count against the connection
cap and their client's share; a client (127.0.0.2) over its share is refused at accept on every
listener while another (127.0.0.1) is served; trusted peers and the mesh listener are exempt;
nothing stays counted once the connections are gone. `geomesh-gateway` as a process under a low
`RLIMIT_NOFILE` fits its cap to the descriptors (logged, exported), and flooded with more idle
connections than it has descriptors it neither spins nor floods its log, keeps serving others
and serves again once the flood is gone. The rules (`fd_pressure`, `admission`) have table
tests at the end.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from regional_gateway.proxy.admission import (
    Admission,
    PenaltyBox,
    Refusal,
    client_key,
    per_client_limit,
)
from regional_gateway.proxy.fd_pressure import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    LOG_INTERVAL,
    AcceptBackoff,
    connection_cap,
    connections_allowed,
)
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, get

ZONE = "apps.test"
ATTACKER = "127.0.0.2"
VICTIM = "127.0.0.1"


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path)


def tls_routes(ca: TestCA, backend: str) -> dict:
    cert, key = ca.issue("zone", [f"*.{ZONE}", ZONE])
    return {"zone": ZONE, "health": {"check": "none"}, "apps": [{"name": "shop", "backends": [backend]}],
            "certificates": [{"cert": str(cert), "key": str(key)}]}


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_tls_connections_awaiting_their_hello_count_against_max_connections(ca, backends, gateway):
    (b,) = backends(1)
    g = gateway(tls_routes(ca, b.address), http=(), https=("127.0.0.1:0",), max_connections=5, header_timeout=5.0)
    idle = [socket.create_connection(g.https) for _ in range(8)]
    try:
        refused = [s for s in idle if closed_by_peer(s, 0.5)]
        assert len(refused) == 3  # 5 slots, taken by connections that have not said hello
        assert g.run(lambda: g.server.metrics.errors.get("too-many-connections", 0)) == 3
        assert g.run(lambda: g.server.pending_tls) == 5
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while g.run(lambda: g.server.pending_tls) and time.monotonic() < deadline:
        time.sleep(0.02)
    with Conn(g.https, tls=ca.client_context(), server_name=f"shop.{ZONE}") as c:
        assert c.request(f"shop.{ZONE}").status == 200
    assert g.run(lambda: g.server.pending_tls) == 0


def wait_until(fn, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_client_over_its_share_is_refused_at_accept_while_others_are_served(ca, backends, gateway):
    (b,) = backends(1)
    g = gateway(tls_routes(ca, b.address), http=("127.0.0.1:0",), https=("127.0.0.1:0",),
                max_connections_per_client=4, header_timeout=5.0)
    held = g.server.admission.held
    host = f"shop.{ZONE}"
    keep = [Conn(g.http, source=ATTACKER, timeout=5) for _ in range(3)]
    idle_tls = socket.create_connection(g.https, source_address=(ATTACKER, 0))  # no hello: pending
    try:
        for c in keep:
            assert c.request(host).status == 200  # keep-alive: each holds its connection
        assert wait_until(lambda: g.run(held, ATTACKER) == 4)
        over = get(g.http, host, source=ATTACKER, timeout=5)  # a 5th, plain: refused with the rule named
        assert over.status == 503 and over.header("x-geomesh-error") == "client-over-share"
        assert b"127.0.0.2 holds its share of 4 connections" in over.body
        extra = socket.create_connection(g.https, source_address=(ATTACKER, 0))  # a 5th, TLS: closed before TLS
        assert closed_by_peer(extra, 2.0)
        extra.close()
        assert get(g.http, host, timeout=5).status == 200  # another client is served on both
        with Conn(g.https, tls=ca.client_context(), server_name=host, timeout=5) as c:
            assert c.request(host).status == 200
        assert g.run(lambda: g.server.metrics.errors.get("client-over-share", 0)) == 2
        keep.pop().close()  # one slot back
        assert wait_until(lambda: g.run(held, ATTACKER) == 3)
        assert get(g.http, host, source=ATTACKER, timeout=5).status == 200
    finally:
        for c in keep:
            c.close()
        idle_tls.close()
    # nothing stays counted: established, TLS-terminated and pending connections all released
    assert wait_until(lambda: g.run(lambda: (g.server.admission.clients(), g.server.pending_tls)) == (0, 0))


def test_trusted_peers_and_the_mesh_listener_are_exempt_from_the_share(backends, gateway):
    (b,) = backends(1)
    routes = {"zone": ZONE, "health": {"check": "none"}, "apps": [{"name": "shop", "backends": [b.address]}]}
    g = gateway(routes, http=("127.0.0.1:0",), mesh=("127.0.0.1:0",), trusted_peers=(ATTACKER,),
                max_connections_per_client=2)
    host = f"shop.{ZONE}"
    conns = [Conn(g.http, source=ATTACKER, timeout=5) for _ in range(4)]  # a trusted peer: 4 of 2
    conns += [Conn(g.mesh, timeout=5) for _ in range(4)]  # the mesh listener: not counted
    try:
        for c in conns:
            assert c.request(host).status == 200
        public = [Conn(g.http, timeout=5) for _ in range(2)]  # 127.0.0.1 on the public listener: 2 of 2
        conns += public
        for c in public:
            assert c.request(host).status == 200
        over = get(g.http, host, timeout=5)
        assert over.status == 503 and over.header("x-geomesh-error") == "client-over-share"
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: g.run(g.server.admission.clients) == 0)


# ------------------------------------------------------------------- out of file descriptors


def _limit_fds() -> None:  # in the child: hard and soft low, so raising soft to hard changes nothing
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(("loop", "share"), [("uvloop", True), ("asyncio", True), ("uvloop", False)],
                         ids=["uvloop", "asyncio", "uvloop-no-share"])
def test_descriptor_limited_gateway_caps_connections_and_serves_through_a_flood(ca, backends, tmp_path, loop, share):
    """RLIMIT_NOFILE 256: the cap is lowered to (256 - 64) / 2 = 96, logged and exported, the
    share is 24. 400 idle TLS and 100 plain connections from one client: its share is taken, the
    rest refused at accept; nothing spins or floods the log, and another client is served all
    along. Without a share (0) the flood takes the whole cap: others get a 503 naming it (not a
    reset), and are served again once the flood is gone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:  # the test's own 500 connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    (b,) = backends(1)
    routes = tmp_path / "routes.toml"
    data = tls_routes(ca, b.address)
    cert = data["certificates"][0]
    routes.write_text(f'zone = "{ZONE}"\n[health]\ncheck = "none"\n[[apps]]\nname = "shop"\n'
                      f'backends = ["{b.address}"]\n[[certificates]]\ncert = "{cert["cert"]}"\nkey = "{cert["key"]}"\n')
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "regional_gateway.main", "--routes", str(routes),
                                 "--http", "127.0.0.1:0", "--https", "127.0.0.1:0", "--no-https-redirect",
                                 "--header-timeout", "20",
                                 "--metrics-port", "0", *([] if share else ["--max-connections-per-client", "0"]),
                                 *(["--no-uvloop"] if loop == "asyncio" else [])],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_fds,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    idle: list[socket.socket] = []
    host = f"shop.{ZONE}"
    try:
        records: dict[str, dict] = {}
        deadline = time.monotonic() + 20
        while not {"proxy listening", "metrics listening"} <= records.keys() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            for line in _log_lines(log_path):
                rec = json.loads(line) if line.startswith("{") else {}
                records.setdefault(rec.get("msg", ""), rec)
            time.sleep(0.05)
        listening = records.get("proxy listening")
        assert listening is not None and "metrics listening" in records, log_path.read_text()
        http = ("127.0.0.1", int(listening["http"].rsplit(":", 1)[1]))
        https = ("127.0.0.1", int(listening["https"].rsplit(":", 1)[1]))
        metrics_port = int(records["metrics listening"]["address"].rsplit(":", 1)[1])
        lowered = records.get("connection cap lowered to fit the file descriptor limit", {})
        assert lowered.get("effective") == 96 and lowered.get("max_connections") == 10000, log_path.read_text()
        assert records["connection limits"]["per_client"] == (24 if share else "off")
        text = _metrics(metrics_port)
        assert _metric(text, "geomesh_gateway_connection_limit", '{scope="total"}') == 96
        assert _metric(text, "geomesh_gateway_connection_limit", '{scope="per_client"}') == (24 if share else 0)
        assert get(http, host).status == 200

        for _ in range(400):  # more than the 256 descriptors, mostly on the TLS port, nothing sent
            idle.append(socket.create_connection(https, timeout=5, source_address=(ATTACKER, 0)))
        for _ in range(100):
            idle.append(socket.create_connection(http, timeout=5, source_address=(ATTACKER, 0)))
        time.sleep(0.5)
        lines0, cpu0, t0 = len(_log_lines(log_path)), _cpu_seconds(proc.pid), time.monotonic()
        if share:  # the other client is served during the flood, on both listeners
            assert get(http, host, timeout=2).status == 200
            with Conn(https, tls=ca.client_context(), server_name=host, timeout=2) as c:
                assert c.request(host).status == 200
        else:  # the flood holds the cap: a precise refusal, at once
            refused = get(http, host, timeout=2)
            assert refused.status == 503 and refused.header("x-geomesh-error") == "too-many-connections"
            assert b"connection limit (96)" in refused.body
        time.sleep(2)
        lines = _log_lines(log_path)[lines0:]
        cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        assert proc.poll() is None
        assert len(lines) < 100, lines[:5]
        assert cpu < 0.5, f"gateway CPU {cpu:.0%} under the flood"
        text = _metrics(metrics_port)
        refused_by = "client-over-share" if share else "too-many-connections"
        assert _metric(text, "geomesh_gateway_errors_total", f'{{cause="{refused_by}"}}') >= 300
        assert _metric(text, "geomesh_gateway_errors_total", '{cause="accept-emfile"}') == 0  # never out of fds
    finally:
        for s in idle:
            s.close()
    try:
        deadline = time.monotonic() + 10
        while True:  # served again once the idle connections are gone
            try:
                assert get(http, host, timeout=2).status == 200
                with Conn(https, tls=ca.client_context(), server_name=host, timeout=2) as c:
                    assert c.request(host).status == 200
                break
            except (OSError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ----------------------------------------------------------------------------- rules (pure)


def test_accept_backoff_doubles_and_logs_once_per_interval():
    b = AcceptBackoff()
    delays, logged = [], []
    for i in range(12):
        delay, suppressed = b.failed(now=i * 0.5)
        delays.append(delay)
        logged.append(suppressed)
    assert delays[:5] == [BACKOFF_MIN, BACKOFF_MIN * 2, BACKOFF_MIN * 4, BACKOFF_MIN * 8, BACKOFF_MAX]
    assert max(delays) == BACKOFF_MAX
    assert logged[0] == 0 and all(x is None for x in logged[1:])  # one line in the first interval
    delay, suppressed = b.failed(now=LOG_INTERVAL + 0.1)
    assert suppressed == 11  # the next line says how many were not logged
    b.succeeded()
    assert b.failed(now=LOG_INTERVAL + 0.2)[0] == BACKOFF_MIN


@pytest.mark.parametrize(("max_connections", "fd_limit", "cap"), [
    (10_000, 1024, 480),  # (1024 - 64) / 2
    (10_000, 512, 224),
    (10_000, 65536, 10_000),
    (480, 1024, 480),
    (481, 1024, 480),
    (10_000, 10, 1),  # never 0: the process must still answer somebody
    (10_000, -1, 10_000),  # RLIM_INFINITY
])
def test_connection_cap(max_connections, fd_limit, cap):
    assert connection_cap(max_connections, fd_limit) == cap
    assert connections_allowed(1024) == 480 and connections_allowed(10) == 0


def test_errno_tables_are_distinct():
    from regional_gateway.proxy.fd_pressure import NO_FD_ERRNOS, TRANSIENT_ERRNOS

    assert errno.EMFILE in NO_FD_ERRNOS and not NO_FD_ERRNOS & TRANSIENT_ERRNOS


@pytest.mark.parametrize(("ip", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same /64: one client
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: its IPv4 address
    ("fe80::1%eth0", "fe80::/64"),  # a scope is not part of the key
    ("not-an-ip:x", "not-an-ip:x"),
])
def test_client_key(ip, key):
    assert client_key(ip) == key


@pytest.mark.parametrize(("configured", "cap", "limit"), [
    (None, 10_000, 2_500),  # a quarter of the cap
    (None, 224, 56),  # 512 descriptors
    (None, 40, 16),  # at least 16...
    (None, 10, 10),  # ...but never above the cap
    (0, 10_000, 0),  # off
    (100, 10_000, 100),
])
def test_per_client_limit(configured, cap, limit):
    assert per_client_limit(configured, cap) == limit


def test_admission_order_box_cap_share():
    adm = Admission(max_connections=10, per_client=2, penalty=PenaltyBox(1.0, 8.0))
    assert adm.check("a", 0.0, total=0) is None
    adm.hold("a")
    adm.hold("a")
    assert adm.check("a", 0.0, total=2) is Refusal.PER_CLIENT
    assert adm.check("b", 0.0, total=2) is None
    assert adm.check("b", 0.0, total=10) is Refusal.MAX_CONNECTIONS  # the cap before the share
    assert adm.check(None, 0.0, total=9) is None and adm.check(None, 0.0, total=10) is Refusal.MAX_CONNECTIONS
    adm.penalty.offend("b", 0.0, "h2-rapid-reset")
    assert adm.check("b", 0.5, total=10) is Refusal.PENALISED  # the box first
    adm.release("a")
    assert adm.check("a", 0.0, total=1) is None and adm.held("a") == 1
    adm.release("a")
    adm.release("a")  # one too many: no negative count
    assert adm.held("a") == 0 and adm.clients() == 0
    off = Admission(max_connections=10, per_client=0)
    for _ in range(20):
        off.hold("a")
    assert off.check("a", 0.0, total=5) is None


def test_penalty_box_doubles_per_repeat_offence_and_forgets():
    box = PenaltyBox(1.0, 8.0, max_clients=3)
    assert box.offend("a", 0.0, "h2-rapid-reset") == 1.0
    assert box.penalised("a", 0.5) == pytest.approx(0.5) and not box.penalised("a", 1.0)
    assert box.offend("a", 0.9, "h2-rapid-reset") is None  # during the cool-down: the same incident
    assert not box.penalised("a", 1.0)
    assert box.offend("a", 1.5, "h2-rapid-reset") == 2.0  # after it: doubled
    assert box.offend("a", 4.0, "h2-control-flood") == 4.0
    assert box.offend("a", 9.0, "h2-rapid-reset") == 8.0
    assert box.offend("a", 18.0, "h2-rapid-reset") == 8.0  # up to the maximum
    assert box.offend("a", 26.0 + 8.0, "h2-rapid-reset") == 1.0  # clean for cooldown_max after it: over
    assert box.offences == {"h2-rapid-reset": 6, "h2-control-flood": 1}
    for k in "bcd":  # bounded: the least recent offender is forgotten
        box.offend(k, 40.0, "h2-rapid-reset")
    assert len(box) == 3 and box.evictions == 1 and not box.penalised("a", 34.5)
    assert box.cooling(40.5) == 3 and box.cooling(50.0) == 0
    off = PenaltyBox(0.0)
    assert off.offend("a", 0.0, "h2-rapid-reset") is None and not off.penalised("a", 0.0)
    with pytest.raises(ValueError):
        PenaltyBox(2.0, 1.0)

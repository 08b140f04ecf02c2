"""Connection limits and file-descriptor exhaustion on the gateway's listeners.

TLS connections waiting for their ClientHello count against `max_connections` (in-process
gateway); and `geomesh-gateway` run as a process under a low `RLIMIT_NOFILE`, flooded with more
idle connections than it has descriptors, neither spins nor floods its log, and serves again
once they are gone. The rules (`fd_pressure`) have table tests at the end.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regional_gateway.proxy.fd_pressure import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    LOG_INTERVAL,
    AcceptBackoff,
    connections_allowed,
    fd_warning,
)
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, get

ZONE = "apps.test"


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


# ------------------------------------------------------------------- out of file descriptors


def _limit_fds() -> None:  # in the child: hard and soft low, so raising soft to hard changes nothing
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_out_of_descriptors_no_spin_no_log_flood_and_recovery(ca, backends, tmp_path, loop):
    """The TLS listener backs off itself; the plain listener is the loop's (uvloop: libuv closes
    pending connections with a spare descriptor; asyncio: pauses 1 s, logs once a second)."""
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
                                 "--http", "127.0.0.1:0", "--https", "127.0.0.1:0", "--header-timeout", "20",
                                 *(["--no-uvloop"] if loop == "asyncio" else [])],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_fds,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    idle: list[socket.socket] = []
    try:
        listening = None
        deadline = time.monotonic() + 20
        while listening is None and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            for line in _log_lines(log_path):
                rec = json.loads(line) if line.startswith("{") else {}
                if rec.get("msg") == "proxy listening":
                    listening = rec
            time.sleep(0.05)
        assert listening is not None, log_path.read_text()
        http = ("127.0.0.1", int(listening["http"].rsplit(":", 1)[1]))
        https = ("127.0.0.1", int(listening["https"].rsplit(":", 1)[1]))
        text = log_path.read_text()
        assert '"soft": 256' in text and "exceeds the 96 proxied connections" in text  # limit logged, warned
        assert get(http, f"shop.{ZONE}").status == 200

        for _ in range(400):  # more than the 256 descriptors, mostly on the TLS port, nothing sent
            idle.append(socket.create_connection(https, timeout=5))
        for _ in range(100):
            idle.append(socket.create_connection(http, timeout=5))
        time.sleep(0.5)
        lines0, cpu0, t0 = len(_log_lines(log_path)), _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(3)
        lines = _log_lines(log_path)[lines0:]
        cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        assert proc.poll() is None
        assert len(lines) < 100, lines[:5]
        assert cpu < 0.5, f"gateway CPU {cpu:.0%} while out of descriptors"
        assert any("accept failed" in line for line in _log_lines(log_path))
    finally:
        for s in idle:
            s.close()
    try:
        deadline = time.monotonic() + 10
        while True:  # served again once the idle connections are gone
            try:
                assert get(http, f"shop.{ZONE}", timeout=2).status == 200
                with Conn(https, tls=ca.client_context(), server_name=f"shop.{ZONE}", timeout=2) as c:
                    assert c.request(f"shop.{ZONE}").status == 200
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


@pytest.mark.parametrize(("max_connections", "fd_limit", "warns"), [
    (10_000, 1024, True),
    (10_000, 65536, False),
    (480, 1024, False),
    (481, 1024, True),
])
def test_fd_warning(max_connections, fd_limit, warns):
    assert (fd_warning(max_connections, fd_limit) is not None) is warns
    assert connections_allowed(1024) == 480 and connections_allowed(10) == 0


def test_errno_tables_are_distinct():
    from regional_gateway.proxy.fd_pressure import NO_FD_ERRNOS, TRANSIENT_ERRNOS

    assert errno.EMFILE in NO_FD_ERRNOS and not NO_FD_ERRNOS & TRANSIENT_ERRNOS

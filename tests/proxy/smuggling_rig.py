"""The rig the HTTP/1.1 smuggling tests share: a real gateway on loopback in front of one
`RecordingBackend`, with a pooled upstream connection before each case (`Rig.warm`), and the two
assertions every case ends with: nothing reached the backend, or exactly the one request expected,
byte for byte."""

from __future__ import annotations

import time
from pathlib import Path

from tests.proxy.client import Conn, Response, get
from tests.proxy.conftest import RunningGateway
from tests.proxy.recording import RecordingBackend, parse_requests

ZONE = "apps.test"
HOST = f"web.{ZONE}"
ADDR = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nForwarded: for=127.0.0.1;proto=http\r\n"
SMUGGLED = (b"GET /slow?ms=1500 HTTP/1.1\r\nHost: admin.internal\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"X-Geomesh-Forwarded: gw-forged\r\n\r\n")


def routes(*backends: str, **top) -> dict:
    return {"zone": ZONE, "name": "gw-a", "region": "eu", "health": {"check": "none"}, **top,
            "apps": [{"name": "web", "lb": "round_robin", "backends": list(backends)}],
            "domains": [{"fqdn": "www.shop.example", "app": "web"}]}


class Rig:
    def __init__(self, tmp: Path, *, upgrade_status: int = 200, **settings) -> None:
        self.rec = RecordingBackend("r1", upgrade_status=upgrade_status)
        self.g = RunningGateway(routes(self.rec.address), tmp, settings)

    def warm(self) -> None:
        """A pooled upstream connection, then a clean record."""
        assert get(self.g.http, HOST, "/warm").status == 200
        self.rec.wait_for(1)
        self.rec.reset()

    def send(self, raw: bytes, *, timeout: float = 5.0) -> tuple[Response, bool]:
        """`raw` on a fresh client connection: the response, and whether the gateway closed after it."""
        self.warm()
        with Conn(self.g.http, timeout=timeout) as c:
            c.send_raw(raw)
            resp = c.read_response()
            c.sock.settimeout(0.5)
            try:
                closed = c.closed_by_peer()
            except TimeoutError:
                closed = False
        return resp, closed

    def close(self) -> None:
        self.g.stop()
        self.rec.close()


def nothing_arrived(rec: RecordingBackend) -> None:
    time.sleep(0.1)  # anything the gateway wrote is on loopback well before this
    assert rec.received() == b"" and rec.requests == [] and rec.errors == []


def exactly(rec: RecordingBackend, raw: bytes, *, raw_too: bool = True) -> None:
    """The backend received exactly the request `raw` and nothing else."""
    want, rest = parse_requests(raw)
    assert len(want) == 1 and rest == b""
    rec.wait_for(1)
    time.sleep(0.05)
    assert rec.errors == []
    assert rec.requests == want
    got, rest = parse_requests(rec.received())
    assert got == want and rest == b""
    if raw_too:
        assert rec.received() == raw


def attack(connection: str, *, chunked: bool = False) -> bytes:
    """The probe's finding-1 request: a POST whose `Connection` names `connection` and whose body is
    the SMUGGLED request (Content-Length or chunked framing)."""
    head = f"POST /a HTTP/1.1\r\nHost: {HOST}\r\nConnection: {connection}\r\n".encode()
    if chunked:
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED)

"""The lab's zone certificate: when the coordinator had it from pebble, and what the gateways serve.

`CertificateWatch` follows `Admin/GetOverview` on a thread of its own from the moment the
coordinator starts (a plain, blocking gRPC channel, so it shares no event loop with the lab), and
notes when the zone's certificate is first listed: the time from an empty lab to the certificate
is measured, not guessed from when someone looked. Its loop is bounded by `deadline` seconds and
ends with `stop()`. `served_serial` makes one TLS handshake naming a host (SNI), verified against
pebble's root alone (and the name), and returns the serial of the leaf the gateway sent: with
the overview's serial it tells that a gateway serves the very certificate the coordinator
obtained. `curl_argv` is the request a person repeats while the lab runs.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from cryptography import x509

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import CHANNEL_OPTIONS
from geomesh.pki import Identity

POLL_EVERY = 0.1  # seconds between two GetOverview calls of the watch


@dataclass(frozen=True, slots=True)
class Obtained:
    """The zone certificate as GetOverview first listed it, and when (seconds after `since`)."""

    name: str
    serial: str
    dns_names: tuple[str, ...]
    not_after: int
    seconds: float


class CertificateWatch:
    """Notes when GetOverview first lists a certificate for `zone` (see the module's docstring)."""

    def __init__(self, address: str, identity: Identity, zone: str, *, since: float,
                 deadline: float = 180.0) -> None:
        self.address = address
        self.identity = identity
        self.zone = zone
        self.since = since  # time.monotonic() of the lab's start
        self.deadline = deadline
        self.obtained: Obtained | None = None
        self.last: pb.CertificateStatus | None = None  # the latest status seen (failures, last error)
        self.error = ""  # the latest GetOverview failure
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-cert-watch", daemon=True)

    def start(self) -> CertificateWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait(self, timeout: float) -> Obtained | None:
        """The certificate once listed (None if not within `timeout` seconds or the watch's deadline)."""
        self._done.wait(timeout)
        return self.obtained

    def why_not(self) -> str:
        """What the overview last said while the certificate was missing."""
        if self.last is not None and self.last.last_error:
            return f"{self.last.failures} failed attempt(s), the last: {self.last.last_error[:300]}"
        return self.error or "not listed in GetOverview yet"

    def _run(self) -> None:
        ca, cert, key = self.identity.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        end = self.since + self.deadline
        try:
            with grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS) as channel:
                admin = pbg.AdminStub(channel)
                while not self._stop.is_set() and time.monotonic() < end:
                    try:
                        overview = admin.GetOverview(pb.Empty(), timeout=5)
                    except grpc.RpcError as exc:
                        self.error = f"GetOverview: {exc.code().name} {exc.details()}"
                    else:
                        if self._look(overview.certificates):
                            return
                    self._stop.wait(POLL_EVERY)
        finally:
            self._done.set()

    def _look(self, certificates: list[pb.CertificateStatus]) -> bool:
        for c in certificates:
            if c.name != self.zone:
                continue
            self.last = c
            if c.not_after > 0 and c.serial:
                self.obtained = Obtained(c.name, c.serial, tuple(c.dns_names), c.not_after,
                                         time.monotonic() - self.since)
                return True
        return False


def served_serial(connect: Callable[[], socket.socket], host: str, root_pem: str, timeout: float = 5.0) -> str:
    """The serial (lower-case hex) of the leaf a TLS server sends for `host`, verified against
    `root_pem` only; raises ssl.SSLError / OSError when the handshake or the check fails."""
    ctx = ssl.create_default_context(cadata=root_pem)
    sock = connect()
    sock.settimeout(timeout)
    with ctx.wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError(f"{host}: the server sent no certificate")
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def https_url(host: str, port: int, path: str = "/") -> str:
    return f"https://{host}{'' if port == 443 else f':{port}'}{path}"


def curl_argv(host: str, address: str, port: int, root: str, *, https: bool = True,
              max_time: float = 5) -> list[str]:
    """curl `host` at the gateway `address`:`port` without asking DNS (`--resolve`); over HTTPS
    trusting only the CA file `root`; giving up after `max_time` seconds."""
    url = https_url(host, port) if https else f"http://{host}{'' if port == 80 else f':{port}'}/"
    argv = ["curl", "-sS", "--max-time", f"{max_time:g}", "--resolve", f"{host}:{port}:{address}"]
    if https:
        argv += ["--cacert", root]
    return [*argv, url]

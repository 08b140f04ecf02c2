"""A real Debian `pebble` ACME test server as a child process, for tests and the lab.

`PebbleProcess` writes what pebble needs into its directory: a throwaway CA and a leaf for its
HTTPS listeners (127.0.0.1, ::1, localhost; the CA is `listener_ca.pem`, the `ca_bundle` an ACME
client trusts) and a config on free loopback ports. `start()` runs `pebble -config ... -dnsserver
...` with `PEBBLE_VA_NOSLEEP=1` (validate at once), `PEBBLE_WFE_NONCEREJECT=0` (no random
badNonce) and `PEBBLE_AUTHZREUSE=0` (every order validates afresh), and waits, bounded, until the
directory answers. Pebble's validation authority resolves every name (TXT for DNS-01, A for
HTTP-01) through `dns_server` only, and connects to HTTP-01 challenges on `http_port`.
`validity_seconds` sets pebble 2.4's `certificateValidityPeriod` (the default is 5 years), so a
renewal can be exercised with certificates that expire within minutes. `root_pem()` fetches the
root that signs this run's certificates from the management endpoint (it is new on every start).
`stop()` ends only the process started here, by its PID; `start()` again restarts it on the same
ports with the same listener CA (pebble itself forgets its accounts, orders and root). Given
`netns` (a `geomesh.lab.netns.Namespace`), pebble runs inside that namespace, where its validation
reaches addresses the host's own namespace must never send to (the lab's gateways on
documentation ranges), and its ACME and management listeners (the namespace's 127.0.0.1) are
relayed to the same port numbers on the host's 127.0.0.1 (`expose_tcp`, closed with the
topology): `directory` and `management` are the same URLs on both sides. No pytest in this module.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geomesh.lab.netns import Namespace

LISTENER_HOSTS = ("127.0.0.1", "::1", "localhost")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class PebbleError(RuntimeError):
    """Pebble did not start, died, or its management endpoint did not answer."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def free_port_both(netns: Namespace, host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` both in the host's namespace and inside `netns` right now."""
    for _ in range(50):
        port = free_port(host)
        if netns.call(_bindable, host, port):
            return port
    raise PebbleError(f"no TCP port free on {host} both here and in {netns.name}")


def write_listener_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA (`listener_ca.pem`) and a serving certificate for LISTENER_HOSTS signed by
    it (`listener.pem`, `listener.key`, mode 0600). Returns the three paths."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=7)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(name("pebble listener test CA"))
          .issuer_name(name("pebble listener test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in LISTENER_HOSTS:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    leaf = (x509.CertificateBuilder().subject_name(name("pebble")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = (directory / "listener_ca.pem", directory / "listener.pem",
                                    directory / "listener.key")
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class PebbleProcess:
    """One pebble on free loopback ports (see the module's docstring)."""

    def __init__(self, directory: Path, *, dns_server: str, http_port: int | None = None,
                 tls_port: int | None = None, validity_seconds: int | None = None,
                 env: dict[str, str] | None = None, netns: Namespace | None = None) -> None:
        self.dir = Path(directory)
        self.dns_server = dns_server
        self.netns = netns
        self.http_port = http_port if http_port is not None else self._free_port()
        self.tls_port = tls_port if tls_port is not None else self._free_port()
        self.validity_seconds = validity_seconds
        self.extra_env = dict(env or {})
        self.port = 0
        self.management_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.listener_ca = self.dir / "listener_ca.pem"
        self.log_path = self.dir / "pebble.log"
        self._relayed = False

    def _free_port(self) -> int:
        return free_port_both(self.netns) if self.netns is not None else free_port()

    @property
    def directory(self) -> str:
        """The ACME directory URL."""
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def management(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self) -> Path:
        cert, key = self.dir / "listener.pem", self.dir / "listener.key"
        if not (self.listener_ca.is_file() and cert.is_file() and key.is_file()):  # a restart keeps them
            self.listener_ca, cert, key = write_listener_tls(self.dir)
        self.port = self.port or self._free_port()
        self.management_port = self.management_port or self._free_port()
        body: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity_seconds is not None:
            body["certificateValidityPeriod"] = int(self.validity_seconds)
        path = self.dir / "pebble-config.json"
        path.write_text(json.dumps({"pebble": body}, indent=2))
        return path

    def start(self, timeout: float = 20.0) -> PebbleProcess:
        binary = shutil.which("pebble")
        if binary is None:
            raise PebbleError("pebble is not installed (Debian package pebble)")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        env.update({"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"})
        env.update(self.extra_env)
        argv = [binary, "-config", str(config), "-dnsserver", self.dns_server]
        if self.netns is not None:
            argv = self.netns.argv(argv)  # `ip netns exec` execs in place: the PID is pebble's
            if not self._relayed:  # the host's 127.0.0.1:<port> -> the namespace's, same numbers
                for port in (self.port, self.management_port):
                    self.netns.expose_tcp(("127.0.0.1", port), listen=("127.0.0.1", port))
                self._relayed = True
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=self.dir,
                                         start_new_session=True)
        self.wait_ready(timeout)
        return self

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.listener_ca))

    def _get(self, url: str, timeout: float = 2.0) -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=self._context()))
        with opener.open(url, timeout=timeout) as resp:
            return resp.read()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the directory answers with JSON naming newOrder; bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise PebbleError(f"pebble exited with {self.proc.returncode if self.proc else None}:\n"
                                  f"{self.log_tail()}")
            if self.netns is not None and not self.netns.call(_accepts, "127.0.0.1", self.port):
                time.sleep(0.1)  # not listening yet: asking through the relay would only log its failure
                continue
            try:
                if "newOrder" in json.loads(self._get(self.directory)):
                    return
            except (OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.1)
        self.stop()
        raise PebbleError(f"pebble's directory {self.directory} did not answer within {timeout}s "
                          f"({last}):\n{self.log_tail()}")

    def root_pem(self) -> str:
        """The root CA (PEM) that signs this pebble run's certificates (`/roots/0`)."""
        return self._management_pem("/roots/0")

    def intermediate_pem(self) -> str:
        return self._management_pem("/intermediates/0")

    def _management_pem(self, path: str) -> str:
        try:
            pem = self._get(self.management + path, timeout=5.0).decode()
        except (OSError, urllib.error.URLError) as e:
            raise PebbleError(f"pebble management {self.management}{path}: {e}") from e
        if "BEGIN CERTIFICATE" not in pem:
            raise PebbleError(f"pebble management {self.management}{path}: not a PEM certificate")
        return pem

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process started here (by its PID), SIGKILL after `timeout`."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def __enter__(self) -> PebbleProcess:
        return self.start() if not self.alive() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

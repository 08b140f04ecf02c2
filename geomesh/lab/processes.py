"""The lab's child processes: real `etcd` servers, and geomesh services started with --port-file.

Used by the lab (its "embedded default"), the tests and the benchmarks; each stops only the
process it started, by PID. `EtcdProcess` spawns one etcd on free loopback ports with a private
data dir: from flags (the default single plaintext member) or from `ETCD_*` settings, the way
Debian's etcd-server reads `/etc/default/etcd`. `start()` waits until etcd answers its health
endpoint; `stop()` ends it, `kill()` SIGKILLs it; `restart()` keeps the data dir, so an outage
can be simulated without losing state. `EtcdCluster` runs N members from the shipped deploy
example (`deploy/etcd/etcd-cluster.env.example`): `cluster_member_env` is the pure translation of
that file to member i on 127.0.0.1 with its own ports and files, so a test of the cluster is a
test of the file. `make_tls_files` makes a throwaway CA, a member certificate and a client
certificate.

`ServiceProcess` runs a geomesh server (`coordinator.main`, `geodns.main`, ...; optionally under a
command prefix such as `taskset -c 1`) from the repository root (`ROOT`). Every geomesh server
writes its bound port to the file named by `--port-file` once it serves, so a caller can bind
port 0 and still learn the port: `start()` waits for that file; `stop()` sends SIGTERM, then
SIGKILL after a deadline.
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
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]  # the repository root (geomesh/lab/processes.py)
DEPLOY_EXAMPLE = ROOT / "deploy" / "etcd" / "etcd-cluster.env.example"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- certificates ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EtcdTlsFiles:
    """PEM files for a TLS etcd: the CA, the members' certificate (server and peer), a client's."""

    ca: Path
    member_cert: Path
    member_key: Path
    client_cert: Path
    client_key: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the CA and presents the client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


def make_tls_files(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                   client_name: str = "geomesh-coordinator") -> EtcdTlsFiles:
    """A throwaway CA (path length 0), one member certificate for `hosts` (serverAuth and
    clientAuth: members are each other's clients) and one client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("geomesh etcd test CA")).issuer_name(name("geomesh etcd test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_path, _ = write("ca", ca, ca_key)

    def leaf(cn: str, usages: list, sans: Sequence[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if sans:
            entries: list[x509.GeneralName] = []
            for h in sans:
                try:
                    entries.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    entries.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    member_cert, member_key = write("member", *leaf("etcd-member", [ExtendedKeyUsageOID.SERVER_AUTH,
                                                                    ExtendedKeyUsageOID.CLIENT_AUTH], hosts))
    client_cert, client_key = write("client", *leaf(client_name, [ExtendedKeyUsageOID.CLIENT_AUTH], ()))
    return EtcdTlsFiles(ca_path, member_cert, member_key, client_cert, client_key)


# -- the deploy example, translated ---------------------------------------------------------------

def read_env_file(text: str) -> dict[str, str]:
    """`KEY="value"` lines of an environment file (Debian's /etc/default style); # comments skipped."""
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k, sep, v = line.partition("=")
        if not sep or not k.isidentifier():
            raise ValueError(f"line {number}: not KEY=value: {line!r}")
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            v = v[1:-1]
        env[k] = v
    return env


def cluster_member_env(example: Mapping[str, str], index: int, ports: Sequence[tuple[int, int]],
                       files: Mapping[str, Path], data_dir: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """The example's settings (node 1 of `ETCD_INITIAL_CLUSTER`) turned into member `index` of a
    cluster on `host`, member j listening for clients on ports[j][0] and peers on ports[j][1].

    As the example's header says: the name and node-specific URLs become member `index`'s; then
    every member's address moves to `host` and its ports; each `*_FILE` path is replaced through
    `files`, the data dir by `data_dir`. A setting left naming a real address, or a file with no
    replacement, raises ValueError: the example and this translation must keep agreeing.
    """
    members = [m.split("=", 1) for m in example["ETCD_INITIAL_CLUSTER"].split(",")]
    if len(members) < len(ports):
        raise ValueError(f"the example's ETCD_INITIAL_CLUSTER has {len(members)} members, {len(ports)} wanted")
    names = [n for n, _ in members]
    peer_urls = [urlsplit(u) for _, u in members]
    own = names.index(example["ETCD_NAME"])
    hosts = [u.hostname or "" for u in peer_urls]
    client_port = next(urlsplit(u).port for u in example["ETCD_ADVERTISE_CLIENT_URLS"].split(",")
                       if urlsplit(u).hostname == hosts[own])
    env: dict[str, str] = {}
    for k, v in example.items():
        if k == "ETCD_NAME":
            v = names[index]
        elif k == "ETCD_DATA_DIR":
            v = str(data_dir)
        elif k.endswith("_FILE"):
            if v not in files:
                raise ValueError(f"{k}: no file given for {v}")
            v = str(files[v])
        elif k != "ETCD_INITIAL_CLUSTER":
            v = v.replace(hosts[own], f"@{index}@")
        env[k] = v
    members_kept = ",".join(f"{n}={u}" for (n, u) in members[: len(ports)])
    env["ETCD_INITIAL_CLUSTER"] = members_kept
    for k, v in env.items():
        for j, (cport, pport) in enumerate(ports):
            v = v.replace(f"{hosts[j]}:{peer_urls[j].port}", f"{host}:{pport}")
            v = v.replace(f"{hosts[j]}:{client_port}", f"{host}:{cport}")
            v = v.replace(f"@{j}@:{peer_urls[j].port}", f"{host}:{pport}")
            v = v.replace(f"@{j}@:{client_port}", f"{host}:{cport}")
        if "@" in v or any(h in v for h in hosts):
            raise ValueError(f"{k}: {v!r} still names an address of the example")
        env[k] = v
    return env


# -- one member ---------------------------------------------------------------------------------

class EtcdProcess:
    def __init__(self, data_dir: Path | None = None, *, host: str = "127.0.0.1", client_port: int = 0,
                 peer_port: int = 0, log_path: Path | None = None, binary: str = "etcd",
                 settings: Mapping[str, str] | None = None, tls: EtcdTlsFiles | None = None) -> None:
        """`settings`: run from these `ETCD_*` variables instead of the single-member flags (their
        first advertised client URL is the endpoint); `tls`: the client files its health check uses."""
        self.host = host
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="geomesh-etcd-"))
        self.settings = dict(settings) if settings is not None else None
        self.tls = tls
        if self.settings is not None:
            url = urlsplit(self.settings["ETCD_ADVERTISE_CLIENT_URLS"].split(",")[0])
            self.host, self.client_port, self.peer_port = url.hostname or host, url.port or 2379, 0
            self.scheme = url.scheme
            self.name = self.settings.get("ETCD_NAME", "default")
        else:
            self.client_port = client_port or free_port(host)
            self.peer_port = peer_port or free_port(host)
            self.scheme = "http"
            self.name = "geomesh"
        self.log_path = log_path or self.data_dir.with_suffix(".log")
        self.binary = shutil.which(binary) or binary
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """host:port (plaintext single member) or https://host:port."""
        target = f"{self.host}:{self.client_port}"
        return target if self.scheme == "http" else f"{self.scheme}://{target}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Start the process without waiting (a cluster member is healthy only once a quorum runs)."""
        if self.alive():
            return
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        if self.settings is not None:
            env.update({"ETCD_LOG_LEVEL": "warn", "ETCD_LOGGER": "zap"}, **self.settings)
            cmd = [self.binary]
        else:
            client = f"http://{self.host}:{self.client_port}"
            peer = f"http://{self.host}:{self.peer_port}"
            cmd = [self.binary, "--name", "geomesh", "--data-dir", str(self.data_dir / "data"),
                   "--listen-client-urls", client, "--advertise-client-urls", client,
                   "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                   "--initial-cluster", f"geomesh={peer}", "--initial-cluster-state", "new",
                   "--log-level", "warn", "--logger", "zap", "--snapshot-count", "10000",
                   "--auto-compaction-mode", "revision", "--auto-compaction-retention", "100000"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()

    def _get(self, path: str, body: bytes | None = None, timeout: float = 1.0) -> bytes:
        ctx = self.tls.ssl_context() if self.tls is not None and self.scheme == "https" else None
        with urllib.request.urlopen(f"{self.url}{path}", data=body, timeout=timeout, context=ctx) as resp:
            return resp.read()

    def healthy(self) -> bool:
        try:
            return b'"health":"true"' in self._get("/health")
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if self.healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd did not become healthy in {timeout}s; see {self.log_path}")

    def start(self, timeout: float = 20.0) -> None:
        if self.alive():
            return
        self.launch()
        self.wait_healthy(timeout)

    def status(self) -> tuple[int, int]:
        """(this member's id, the leader's id as this member knows it; 0: none)."""
        reply = json.loads(self._get("/v3/maintenance/status", b"{}"))
        return int(reply["header"]["member_id"]), int(reply.get("leader", 0))

    def kill(self) -> None:
        """SIGKILL: the member dies without a word, as on a power cut."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            try:
                self.log_path.unlink()
            except FileNotFoundError:
                pass


# -- a cluster ----------------------------------------------------------------------------------

class EtcdCluster:
    """N etcd members on 127.0.0.1 run from the deploy example, over TLS with throwaway certificates."""

    def __init__(self, workdir: Path, size: int = 3, *, example: Path = DEPLOY_EXAMPLE,
                 host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.tls = make_tls_files(self.workdir / "pki", hosts=(host, "localhost"))
        settings = read_env_file(example.read_text())
        files = self.example_files(settings, self.tls)
        ports = [(free_port(host), free_port(host)) for _ in range(size)]
        self.members = [
            EtcdProcess(self.workdir / f"member{i}", log_path=self.workdir / f"member{i}.log", tls=self.tls,
                        settings=cluster_member_env(settings, i, ports, files, self.workdir / f"member{i}" / "data",
                                                    host))
            for i in range(size)]

    @staticmethod
    def example_files(settings: Mapping[str, str], tls: EtcdTlsFiles) -> dict[str, Path]:
        """The example's *_FILE paths mapped to our files by what they hold (CA, key, certificate)."""
        files: dict[str, Path] = {}
        for k, v in settings.items():
            if k.endswith("TRUSTED_CA_FILE"):
                files[v] = tls.ca
            elif k.endswith("KEY_FILE"):
                files[v] = tls.member_key
            elif k.endswith("CERT_FILE"):
                files[v] = tls.member_cert
        return files

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            m.launch()
        for m in self.members:
            m.wait_healthy(timeout)

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the member the live members agree leads (waits for an election)."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[int, int] = {}
            leaders: set[int] = set()
            for i, m in enumerate(self.members):
                if not m.alive():
                    continue
                try:
                    member_id, leader = m.status()
                except (OSError, ValueError, KeyError):
                    continue
                ids[member_id] = i
                leaders.add(leader)
            if len(leaders) == 1 and (lead := leaders.pop()) in ids:
                return ids[lead]
            if time.monotonic() > deadline:
                raise TimeoutError("the etcd members do not agree on a leader")
            time.sleep(0.05)

    def index_of(self, endpoint: str) -> int:
        return self.endpoints.index(endpoint)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


# -- geomesh services ---------------------------------------------------------------------------

class ServiceProcess:
    def __init__(self, module: str, args: Sequence[str], workdir: Path, *, name: str | None = None,
                 prefix: Sequence[str] = (), python: Sequence[str] | None = None) -> None:
        self.module = module
        self.args = list(args)
        self.workdir = Path(workdir)
        self.name = name or module.split(".")[0]
        self.prefix = list(prefix)
        self.python = list(python) if python is not None else [sys.executable]
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        cmd = [*self.prefix, *self.python, "-m", self.module, *self.args, "--port-file", str(port_file)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                     start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                return self.port
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not start in {timeout}s: {self.log()[-2000:]}")

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stop the process (SIGKILL after `timeout`); returns its exit code (None: not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

"""geomesh's PKI: a private CA and the certificates of every identity (admin, gateway, dns).

A certificate carries its identity in the subject: CN = name, OU = role. The coordinator's gRPC
port requires a client certificate signed by this CA (mTLS) and reads role and name from it;
nothing else identifies a caller. Keys are EC P-256, written with mode 0600.

Issuing is offline: only `geomesh pki` uses `ca.key`. A coordinator host needs `ca.pem` and its
own serving certificate and key (`Pki.serving()`, never issues). Beyond the TLS handshake's chain
verification the coordinator applies `check_client_cert` to every client certificate: issued
directly by the CA (the CA says pathLenConstraint 0: no intermediate), not a CA itself, EKU
clientAuth present, exactly one OU (the role) and one CN (the name); anything else is
UNAUTHENTICATED. Every issued certificate is recorded in `issued.jsonl` (`geomesh pki list`) so
a certificate can be revoked by serial after its file was replaced.

Layout of a PKI directory::

    ca.pem  ca.key                    the CA (keep ca.key off coordinator hosts)
    server/<name>.pem  .key           coordinator serving certificates
    <role>/<name>.pem  .key           client identities
    issued.jsonl                      one line per issued certificate (serial, role, name, dates)
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geomesh import validate
from geomesh.errors import UnauthenticatedError, ValidationError

ROLES = ("admin", "gateway", "dns")
SERVER_NAME = "geomesh-coordinator"  # the name clients verify the coordinator's certificate for
CA_DAYS = 3650
CERT_DAYS = 825
ISSUED_LOG = "issued.jsonl"


def serial_hex(serial: int) -> str:
    """A certificate serial as geomesh writes it everywhere: lower-case hex, no separators."""
    return format(serial, "x")


@dataclass(frozen=True, slots=True)
class ClientCert:
    """Who a verified client certificate names: role (OU), name (CN) and serial (hex)."""

    role: str
    name: str
    serial: str


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """One line of `issued.jsonl`."""

    serial: str
    role: str
    name: str
    not_before: str
    not_after: str
    path: str


@dataclass(frozen=True, slots=True)
class Identity:
    role: str
    name: str
    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes, as grpc credentials want them."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Pki:
    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)

    @property
    def ca_cert_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.dir / "ca.key"

    def exists(self) -> bool:
        return self.ca_cert_path.exists() and self.ca_key_path.exists()

    def init(self, common_name: str = "geomesh CA") -> bool:
        """Create the CA if absent. Returns True when a new CA was made."""
        if self.exists():
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "geomesh")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.ca_key_path, _key_pem(key))
        self.ca_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return True

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise FileNotFoundError(f"no CA in {self.dir}: run `geomesh pki init --dir {self.dir}`")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def _sign(self, subject: x509.Name, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
              cert_path: Path, key_path: Path) -> x509.Certificate:
        ca_cert, ca_key = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_private(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._record(cert, cert_path)
        return cert

    def _record(self, cert: x509.Certificate, cert_path: Path) -> None:
        ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        line = {"serial": serial_hex(cert.serial_number), "role": str(ous[0].value) if ous else "",
                "name": str(cns[0].value) if cns else "", "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "path": str(cert_path.relative_to(self.dir) if cert_path.is_relative_to(self.dir) else cert_path)}
        with (self.dir / ISSUED_LOG).open("a") as f:
            f.write(json.dumps(line) + "\n")

    def issued(self) -> Iterator[IssuedCert]:
        """Every certificate issued from this directory, oldest first (`issued.jsonl`); lines
        that do not parse are skipped."""
        path = self.dir / ISSUED_LOG
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
                yield IssuedCert(str(d["serial"]), str(d["role"]), str(d["name"]), str(d["not_before"]),
                                 str(d["not_after"]), str(d["path"]))
            except (ValueError, KeyError, TypeError):
                continue

    def issue(self, role: str, name: str) -> Identity:
        """Issue (or re-issue) the client certificate of `name` in `role`."""
        if role not in ROLES:
            raise ValidationError("role", f"{role!r} is not one of {', '.join(ROLES)}")
        validate.dns_label("name", name)
        cert_path = self.dir / role / f"{name}.pem"
        key_path = self.dir / role / f"{name}.key"
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "geomesh")])
        self._sign(subject, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH, cert_path, key_path)
        return Identity(role, name, self.ca_cert_path, cert_path, key_path)

    def identity(self, role: str, name: str) -> Identity:
        """An identity issued earlier, issuing it on first use."""
        cert_path = self.dir / role / f"{name}.pem"
        if cert_path.exists():
            return Identity(role, name, self.ca_cert_path, cert_path, self.dir / role / f"{name}.key")
        return self.issue(role, name)

    def server(self, hosts: list[str] | None = None, *, force: bool = False) -> Identity:
        """The coordinator's serving certificate for SERVER_NAME + hosts, issued (needs ca.key)
        when absent or when `force`."""
        cert_path = self.dir / "server" / f"{SERVER_NAME}.pem"
        key_path = self.dir / "server" / f"{SERVER_NAME}.key"
        if force or not cert_path.exists():
            sans: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME), x509.DNSName("localhost")]
            for host in ["127.0.0.1", "::1", *(hosts or [])]:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    sans.append(x509.DNSName(host))
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "coordinator")])
            self._sign(subject, sans, ExtendedKeyUsageOID.SERVER_AUTH, cert_path, key_path)
        return Identity("coordinator", SERVER_NAME, self.ca_cert_path, cert_path, key_path)

    def serving(self, hosts: tuple[str, ...] = ()) -> Identity:
        """The coordinator's serving identity as issued by `geomesh pki init` / `pki server`:
        read only, never issued here (a coordinator host holds no ca.key). FileNotFoundError
        names what is missing; ValueError names a host the certificate does not cover."""
        cert_path = self.dir / "server" / f"{SERVER_NAME}.pem"
        key_path = self.dir / "server" / f"{SERVER_NAME}.key"
        for path in (self.ca_cert_path, cert_path, key_path):
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: run `geomesh pki init --dir DIR` where the CA key "
                                        "is, and copy ca.pem and server/ to the coordinator host")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        missing = [h for h in hosts if not _covers(cert, h)]
        if missing:
            raise ValueError(f"the serving certificate does not cover {', '.join(missing)}: reissue it with "
                             f"`geomesh pki server --dir DIR --server-host HOST`")
        return Identity("coordinator", SERVER_NAME, self.ca_cert_path, cert_path, key_path)


def _covers(cert: x509.Certificate, host: str) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in sans.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host.lower() in (n.lower() for n in sans.get_values_for_type(x509.DNSName))


def identity_of_pem(pem: bytes) -> tuple[str, str]:
    """(role, name) from a verified client certificate's subject (OU, CN)."""
    cert = _load(pem)
    ident = _subject_identity(cert)
    return ident.role, ident.name


def _load(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UnauthenticatedError(f"unreadable client certificate: {exc}") from None


def _subject_identity(cert: x509.Certificate) -> ClientCert:
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not ous or not cns:
        raise UnauthenticatedError("client certificate has no OU (role) or CN (name)")
    if len(ous) != 1:
        raise UnauthenticatedError(f"client certificate has {len(ous)} OUs: exactly one (the role) is allowed")
    if len(cns) != 1:
        raise UnauthenticatedError(f"client certificate has {len(cns)} CNs: exactly one (the name) is allowed")
    role, name = str(ous[0].value), str(cns[0].value)
    if role not in ROLES:
        raise UnauthenticatedError(f"client certificate role {role!r} is not one of {', '.join(ROLES)}")
    return ClientCert(role, name, serial_hex(cert.serial_number))


def ca_path_length(ca: x509.Certificate) -> int | None:
    """The CA's pathLenConstraint (None: unlimited or absent)."""
    try:
        return ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


def check_client_cert(pem: bytes, ca: x509.Certificate) -> ClientCert:
    """The identity of a client certificate the TLS handshake accepted, or UnauthenticatedError
    naming the rule it breaks (see the module text). Pure: no I/O, no clock (the handshake
    checked the dates)."""
    cert = _load(pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        limit = ca_path_length(ca)
        if limit == 0:
            raise UnauthenticatedError("client certificate is not issued directly by the CA, which allows no "
                                       "intermediate (pathLenConstraint 0)") from None
        raise UnauthenticatedError("client certificate is not issued directly by the CA: "
                                   "intermediate CAs are not accepted") from None
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise UnauthenticatedError("client certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise UnauthenticatedError("client certificate has no extended key usage: clientAuth is required") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise UnauthenticatedError("client certificate's extended key usage lacks clientAuth")
    return _subject_identity(cert)

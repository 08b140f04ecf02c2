"""geomesh's PKI: a private CA and the certificates of every identity (admin, gateway, dns).

A certificate carries its identity in the subject: CN = name, OU = role. The coordinator's gRPC
port requires a client certificate signed by this CA (mTLS) and reads role and name from it;
nothing else identifies a caller. Keys are EC P-256, written with mode 0600.

Layout of a PKI directory::

    ca.pem  ca.key                    the CA
    server/<name>.pem  .key           coordinator serving certificates
    <role>/<name>.pem  .key           client identities
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geomesh import validate
from geomesh.errors import UnauthenticatedError, ValidationError

ROLES = ("admin", "gateway", "dns")
SERVER_NAME = "geomesh-coordinator"  # the name clients verify the coordinator's certificate for
CA_DAYS = 3650
CERT_DAYS = 825


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
              cert_path: Path, key_path: Path) -> None:
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

    def server(self, hosts: list[str] | None = None) -> Identity:
        """The coordinator's serving certificate (issued on first use) for SERVER_NAME + hosts."""
        cert_path = self.dir / "server" / f"{SERVER_NAME}.pem"
        key_path = self.dir / "server" / f"{SERVER_NAME}.key"
        if not cert_path.exists():
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


def identity_of_pem(pem: bytes) -> tuple[str, str]:
    """(role, name) from a verified client certificate's subject (OU, CN)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise UnauthenticatedError(f"unreadable client certificate: {exc}") from None
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not ous or not cns:
        raise UnauthenticatedError("client certificate has no OU (role) or CN (name)")
    role, name = str(ous[0].value), str(cns[0].value)
    if role not in ROLES:
        raise UnauthenticatedError(f"client certificate role {role!r} is not one of {', '.join(ROLES)}")
    return role, name

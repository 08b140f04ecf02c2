"""Certificate bundles as the coordinator sends them, made in-test: a throwaway CA (`cryptography`),
a leaf for given names and serial, its key sealed to a gateway's sealing key."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from geomesh.api import geomesh_pb2 as pb
from geomesh.sealing import seal

PKCS8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()


@dataclass(frozen=True)
class Leaf:
    chain_pem: str
    key_pem: bytes
    serial: int
    not_after: int


class ThrowawayCA:
    """A root and an intermediate, as an ACME CA chains a leaf."""

    def __init__(self, name: str = "throwaway root") -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.root = self._ca(root_name, root_name, self.root_key.public_key(), self.root_key, now)
        self.key = ec.generate_private_key(ec.SECP256R1())
        inter_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} intermediate")])
        self.cert = self._ca(inter_name, root_name, self.key.public_key(), self.root_key, now)
        self.root_pem = self.root.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def _ca(subject: x509.Name, issuer: x509.Name, public, signer, now) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=90))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(signer, hashes.SHA256()))

    def leaf(self, names: list[str], serial: int | None = None, *, days: float = 30) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = serial or x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(days=2))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .sign(self.key, hashes.SHA256()))
        chain = (cert.public_bytes(serialization.Encoding.PEM) + self.cert.public_bytes(serialization.Encoding.PEM))
        return Leaf(chain.decode(), key.private_bytes(*PKCS8), serial, int(cert.not_valid_after_utc.timestamp()))


def bundle(name: str, leaf: Leaf, recipient: bytes, *, names: list[str] | None = None,
           serial: str | None = None, sealed_serial: str | None = None, key_pem: bytes | None = None,
           chain_pem: str | None = None) -> pb.CertificateBundle:
    """The bundle of `leaf` for the gateway whose sealing public key is `recipient` (the keyword
    arguments make it wrong in one way)."""
    serial = serial if serial is not None else f"{leaf.serial:x}"
    context = f"cert:{name}:{sealed_serial if sealed_serial is not None else serial}".encode()
    if names is None:
        cert = x509.load_pem_x509_certificate(leaf.chain_pem.encode())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    return pb.CertificateBundle(name=name, dns_names=names, chain_pem=chain_pem or leaf.chain_pem,
                                sealed_key=seal(recipient, key_pem or leaf.key_pem, context),
                                not_after=leaf.not_after, serial=serial)

"""The certificates the coordinator sends a gateway: opened, checked, kept on disk, put in service.

The coordinator sends the whole set in `SessionDown.certificates` (with `certificates_set`): for
each, the chain in PEM and the private key sealed to this gateway's X25519 sealing key
(`geomesh.sealing`, context `cert:<name>:<serial>`; the sealing key lives in the state directory,
mode 0600, and its public half goes out at Register). `open_bundle` (no I/O) unseals the key in
memory and checks the bundle: a usable name, sizes in bounds, the chain parses (each certificate
issued by the next, nothing but certificates), the key is the leaf's, the leaf's DNS names are the
bundle's, the serial is the leaf's and it has not expired. `CertificateIntake.apply` then writes
the chain and the key (mode 0600 from creation) in a staging directory, loads the TLS contexts
from there, and renames both into `<certs dir>/<name>.pem` and `<name>.key`; the set it returns
goes to the proxy's `CertificateStore` in one swap. A bundle that fails is logged with its reason
and counted (`geomesh_gateway_certificate_intake_failures_total{reason}`), and the certificate of
that name already in service stays. A name absent from a new set leaves service and disk. A
bundle whose name and serial are in service already is not opened again. At start, `load_saved`
puts the certificates saved in the certs directory in service before any coordinator is reached
(docs/certificates.md, "On the gateway").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client import Counter

from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import GeomeshError, ValidationError
from geomesh.logs import event
from geomesh.sealing import SealError, unseal, write_private_file
from regional_gateway.proxy.certificates import ManagedCertificate
from regional_gateway.proxy.certificates import load as load_certificate
from regional_gateway.proxy.routes import CertificateSpec

log = logging.getLogger("geomesh.gateway.certs")

FAILURES = Counter("geomesh_gateway_certificate_intake_failures",
                   "certificates from the coordinator (or saved ones at start) not put in service, by reason",
                   ["reason"])

MAX_BUNDLES = 512             # certificates in one set (the zone's and custom domains'); the rest are refused
                              # ("too_many"); 512 of ~4 KB stay well under grpc's 4 MB message limit
MAX_CHAIN_BYTES = 64 * 1024   # a chain in PEM
MAX_SEALED_KEY_BYTES = 16 * 1024
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
_STAGING = ".staging-"


class IntakeError(GeomeshError):
    """A bundle (or a saved certificate) that is not put in service; `reason` labels the metric."""

    def __init__(self, name: str, reason: str, message: str) -> None:
        super().__init__(f"certificate {name[:80]!r}: {reason}: {message}")
        self.name, self.reason, self.message = name, reason, message


@dataclass(frozen=True, slots=True)
class SealedBundle:
    """A `CertificateBundle` as it came (the key still sealed)."""

    name: str
    dns_names: tuple[str, ...]
    chain_pem: str
    sealed_key: bytes = field(repr=False)
    serial: str
    not_after: int = 0

    @classmethod
    def from_proto(cls, m: pb.CertificateBundle) -> SealedBundle:
        return cls(m.name, tuple(m.dns_names), m.chain_pem, m.sealed_key, m.serial, m.not_after)


@dataclass(frozen=True, slots=True)
class OpenedBundle:
    """A bundle that passed every check: the chain re-encoded (certificates only) and the key."""

    name: str
    serial: int
    dns_names: tuple[str, ...]
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    not_after: float


def key_context(name: str, serial: str) -> bytes:
    """The context a certificate's key is sealed under (the coordinator's `cert_records.key_context`)."""
    return f"cert:{name}:{serial}".encode()


def checked_name(name: str) -> str:
    """A certificate name fit to be a file name: a lowercase domain name as `validate.fqdn` has it."""
    try:
        if validate.fqdn("name", name) != name:
            raise ValidationError("name", f"{name[:80]!r} is not in canonical form (lowercase, no trailing dot)")
    except ValidationError as exc:
        raise IntakeError(name, "name", exc.message) from None
    return name


def parse_serial(name: str, serial: str) -> int:
    try:
        return int(serial.replace(":", ""), 16)
    except ValueError:
        raise IntakeError(name, "serial", f"{serial[:80]!r} is not a hex serial number") from None


def open_bundle(bundle: SealedBundle, sealing_key: X25519PrivateKey, now: float) -> OpenedBundle:
    """Unseal and check one bundle (IntakeError with the reason when it does not pass)."""
    name = checked_name(bundle.name)
    if len(bundle.chain_pem) > MAX_CHAIN_BYTES or len(bundle.sealed_key) > MAX_SEALED_KEY_BYTES:
        raise IntakeError(name, "size", f"chain {len(bundle.chain_pem)} bytes (at most {MAX_CHAIN_BYTES}), sealed "
                          f"key {len(bundle.sealed_key)} bytes (at most {MAX_SEALED_KEY_BYTES})")
    serial = parse_serial(name, bundle.serial)
    try:
        key_pem = unseal(sealing_key, bundle.sealed_key, key_context(name, bundle.serial))
    except SealError as exc:
        raise IntakeError(name, "unseal", f"the key does not open with this gateway's sealing key ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IntakeError(name, "key", f"the unsealed key is not an unencrypted PEM private key ({exc})") from None
    if "PRIVATE KEY" in bundle.chain_pem:
        raise IntakeError(name, "chain", "the chain holds a private key")
    try:
        chain = x509.load_pem_x509_certificates(bundle.chain_pem.encode())
    except ValueError as exc:
        raise IntakeError(name, "chain", f"not PEM certificates ({exc})") from None
    for i, (child, parent) in enumerate(pairwise(chain)):
        if child.issuer != parent.subject:
            raise IntakeError(name, "chain", f"certificate {i} is not issued by certificate {i + 1}")
    leaf = chain[0]
    if leaf.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise IntakeError(name, "key_mismatch", "the key is not the leaf certificate's")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        leaf_names = {n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        leaf_names = set()
    named = {n.lower().rstrip(".") for n in bundle.dns_names}
    if not leaf_names or leaf_names != named:
        raise IntakeError(name, "names", f"the leaf names {sorted(leaf_names)[:8]}, the bundle {sorted(named)[:8]}")
    if serial != leaf.serial_number:
        raise IntakeError(name, "serial", f"the bundle says {bundle.serial[:80]!r}, the leaf {leaf.serial_number:x}")
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise IntakeError(name, "expired", f"the leaf expired at {int(not_after)}")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return OpenedBundle(name, serial, tuple(sorted(leaf_names)), pem, key_pem, not_after)


class CertificateIntake:
    """The managed certificates of one gateway: on disk in `directory`, in service as returned."""

    def __init__(self, sealing_key: X25519PrivateKey, directory: Path, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.sealing_key = sealing_key
        self.dir = directory
        self.clock = clock
        self._served: dict[str, ManagedCertificate] = {}

    def in_service(self) -> list[ManagedCertificate]:
        return [self._served[n] for n in sorted(self._served)]

    def _refuse(self, exc: IntakeError, kept: bool) -> None:
        FAILURES.labels(exc.reason).inc()
        event(log, "certificate refused" + (", keeping the one in service" if kept else ""), logging.ERROR,
              name=exc.name[:80], reason=exc.reason, error=exc.message)

    def load_saved(self) -> list[ManagedCertificate]:
        """The certificates saved by earlier runs, in service from now (a bad one: logged, counted, skipped)."""
        served: dict[str, ManagedCertificate] = {}
        if self.dir.is_dir():
            for stale in self.dir.glob(f"{_STAGING}*"):
                shutil.rmtree(stale, ignore_errors=True)
            for pem in sorted(self.dir.glob("*.pem")):
                try:
                    name = checked_name(pem.stem)
                    loaded = load_certificate(CertificateSpec(pem, pem.with_suffix(".key")), f"saved {pem.name}")
                except IntakeError as exc:
                    self._refuse(IntakeError(exc.name, "saved", exc.message), kept=False)
                    continue
                except ValidationError as exc:
                    self._refuse(IntakeError(pem.stem, "saved", str(exc)), kept=False)
                    continue
                served[name] = ManagedCertificate(name, loaded)
                level = logging.WARNING if loaded.not_after <= self.clock() else logging.INFO
                event(log, "saved certificate in service", level, name=name, serial=f"{loaded.serial:x}",
                      not_after=int(loaded.not_after), names=",".join(loaded.names))
        self._served = served
        return self.in_service()

    def apply(self, bundles: Sequence[pb.CertificateBundle]) -> list[ManagedCertificate]:
        """Take a whole set (`SessionDown.certificates` with `certificates_set`); returns the set in service."""
        out: dict[str, ManagedCertificate] = {}
        seen: set[str] = set()
        if len(bundles) > MAX_BUNDLES:  # the rest are refused as one: counted each, logged once
            extra = bundles[MAX_BUNDLES:]
            FAILURES.labels("too_many").inc(len(extra))
            event(log, "certificates refused: too many in one set, keeping those in service", logging.ERROR,
                  reason="too_many", refused=len(extra), limit=MAX_BUNDLES)
            out.update({b.name: self._served[b.name] for b in extra if b.name in self._served})
            bundles = bundles[:MAX_BUNDLES]
        for raw in bundles:
            bundle = SealedBundle.from_proto(raw)
            if bundle.name in seen:
                self._refuse(IntakeError(bundle.name, "duplicate", "named twice in one set: the first counts"),
                             kept=True)
                continue
            seen.add(bundle.name)
            current = self._served.get(bundle.name)
            try:
                if current is not None and current.loaded.serial == parse_serial(bundle.name, bundle.serial):
                    out[bundle.name] = current  # in service already: not opened again
                    continue
                out[bundle.name] = self._install(open_bundle(bundle, self.sealing_key, self.clock()))
            except IntakeError as exc:
                self._refuse(exc, kept=current is not None)
                if current is not None:
                    out[bundle.name] = current
        for gone in sorted(set(self._served) - set(out)):
            for suffix in (".pem", ".key"):
                (self.dir / f"{gone}{suffix}").unlink(missing_ok=True)
            event(log, "certificate withdrawn", name=gone)
        self._served = out
        return self.in_service()

    def _install(self, opened: OpenedBundle) -> ManagedCertificate:
        """Write the files in a staging directory, load the TLS contexts from them, rename into place."""
        name = opened.name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            staging = self.dir / f"{_STAGING}{secrets.token_hex(4)}"
            staging.mkdir(mode=0o700)
        except OSError as exc:
            raise IntakeError(name, "storage", f"cannot prepare {self.dir}: {exc.strerror}") from None
        try:
            pem, key = staging / f"{name}.pem", staging / f"{name}.key"
            pem.write_bytes(opened.chain_pem)
            write_private_file(key, opened.key_pem)
            try:
                loaded = load_certificate(CertificateSpec(pem, key), f"certificate {name}")
            except ValidationError as exc:
                raise IntakeError(name, "load", exc.message) from None
            final = CertificateSpec(self.dir / pem.name, self.dir / key.name)
            os.replace(key, final.key)  # a crash between the two: a pair that does not load at start (skipped)
            os.replace(pem, final.cert)
        except OSError as exc:
            raise IntakeError(name, "storage", f"cannot write {exc.filename}: {exc.strerror}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        event(log, "certificate in service", name=name, serial=f"{opened.serial:x}", not_after=int(opened.not_after),
              names=",".join(opened.dns_names))
        return ManagedCertificate(name, dataclasses.replace(loaded, spec=final))

"""TLS certificates for termination: chosen by SNI, loaded from PEM files, reloaded on change.

Each `CertificateSpec` (cert chain + key file) is served for the DNS names in its
subjectAltName (exact names and `*.` wildcards, one label deep, as RFC 6125 6.4.3 allows), or its
common name when it has no SAN. `context_for(name)` gives the `ssl.SSLContext` to terminate with:
the exact name, then the wildcard, then the default (the first certificate). Two contexts per
certificate: ALPN http/1.1 for HTTP termination, ALPN h2 for the `g` form. `refresh()` (called
on a timer) reloads a certificate whose files changed; a file that fails to load is reported and
the previous certificate stays in service.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from geomesh.errors import ValidationError
from geomesh.logs import event
from regional_gateway.proxy.routes import CertificateSpec

log = logging.getLogger("geomesh.gateway.certs")


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    spec: CertificateSpec
    stamp: tuple[float, int, float, int]  # cert mtime/size, key mtime/size
    names: tuple[str, ...]
    http: ssl.SSLContext
    h2: ssl.SSLContext


def _stamp(spec: CertificateSpec) -> tuple[float, int, float, int]:
    c, k = os.stat(spec.cert), os.stat(spec.key)
    return (c.st_mtime, c.st_size, k.st_mtime, k.st_size)


def _context(spec: CertificateSpec, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(spec.cert), str(spec.key))
    ctx.set_alpn_protocols(alpn)
    return ctx


def load(spec: CertificateSpec, field: str = "certificate") -> LoadedCertificate:
    """Load and check one certificate (raises ValidationError naming `field`)."""
    try:
        stamp = _stamp(spec)
        pem = Path(spec.cert).read_bytes()
    except OSError as exc:
        raise ValidationError(field, f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ValidationError(f"{field}.cert", f"{spec.cert} is not a PEM certificate ({exc})") from None
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not names:
        raise ValidationError(f"{field}.cert", f"{spec.cert} names no DNS name (no SAN DNS entry, no CN)")
    try:
        http = _context(spec, ["http/1.1"])
        h2 = _context(spec, ["h2"])
    except (ssl.SSLError, OSError) as exc:
        raise ValidationError(f"{field}.key", f"{spec.key} does not load with {spec.cert}: {exc}") from None
    return LoadedCertificate(spec, stamp, tuple(names), http, h2)


class CertificateStore:
    """The certificates in service, indexed by name."""

    def __init__(self, loaded: list[LoadedCertificate] | None = None) -> None:
        self._certs: list[LoadedCertificate] = list(loaded or [])
        self._index()

    @classmethod
    def from_specs(cls, specs: tuple[CertificateSpec, ...]) -> CertificateStore:
        return cls([load(s, f"certificates[{i}]") for i, s in enumerate(specs)])

    def _index(self) -> None:
        exact: dict[str, LoadedCertificate] = {}
        wild: dict[str, LoadedCertificate] = {}
        for c in self._certs:
            for n in c.names:
                if n.startswith("*."):
                    wild.setdefault(n[2:], c)
                else:
                    exact.setdefault(n, c)
        self._exact, self._wild = exact, wild

    @property
    def empty(self) -> bool:
        return not self._certs

    def names(self) -> list[str]:
        return sorted({n for c in self._certs for n in c.names})

    def context_for(self, server_name: str, *, h2: bool = False) -> ssl.SSLContext | None:
        c = self._exact.get(server_name)
        if c is None and "." in server_name:
            c = self._wild.get(server_name.split(".", 1)[1])
        if c is None:
            if not self._certs:
                return None
            c = self._certs[0]
        return c.h2 if h2 else c.http

    def update(self, specs: tuple[CertificateSpec, ...]) -> None:
        """Serve exactly `specs` (already validated), reusing certificates whose files did not change."""
        old = {c.spec: c for c in self._certs}
        out = []
        for i, s in enumerate(specs):
            c = old.get(s)
            try:
                if c is None or _stamp(s) != c.stamp:
                    c = load(s, f"certificates[{i}]")
            except ValidationError as exc:
                if c is None:
                    event(log, "certificate not loaded", logging.ERROR, cert=str(s.cert), error=str(exc))
                    continue
                event(log, "certificate reload failed, keeping the previous one", logging.ERROR,
                      cert=str(s.cert), error=str(exc))
            out.append(c)
        self._certs = out
        self._index()

    def refresh(self) -> int:
        """Reload certificates whose files changed; returns how many were reloaded."""
        changed = 0
        out = []
        for c in self._certs:
            try:
                stamp = _stamp(c.spec)
            except OSError as exc:
                event(log, "certificate file unreadable, keeping the loaded one", logging.WARNING,
                      cert=str(c.spec.cert), error=str(exc))
                out.append(c)
                continue
            if stamp != c.stamp:
                try:
                    new = load(c.spec)
                    event(log, "certificate reloaded", cert=str(c.spec.cert), names=",".join(new.names))
                    out.append(new)
                    changed += 1
                    continue
                except ValidationError as exc:
                    event(log, "certificate reload failed, keeping the previous one", logging.ERROR,
                          cert=str(c.spec.cert), error=str(exc))
            out.append(c)
        if changed:
            self._certs = out
            self._index()
        return changed

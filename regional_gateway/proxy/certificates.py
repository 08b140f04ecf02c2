"""TLS certificates for termination: chosen by SNI, loaded from PEM files, reloaded on change.

Two sources. "file": each `CertificateSpec` (cert chain + key file) of the config or routes file;
`refresh()` (called on a timer) reloads one whose files changed, and a file that fails to load is
reported while the previous certificate stays in service. "managed": the certificates the
coordinator obtained and sent sealed to this gateway (`regional_gateway.certificate_intake`),
replaced as a whole set by `set_managed`. A certificate is served for the DNS names in its
subjectAltName (exact names and `*.` wildcards, one label deep, as RFC 6125 6.4.3 allows), or its
common name when it has no SAN. `context_for(name)` gives the `ssl.SSLContext` to terminate with:
the exact name in either source, then the wildcard in either, then the default (the first file
certificate, else the first managed one by name). Where both sources hold the same name, the
file wins: it is the operator's explicit choice. Two contexts per certificate: ALPN http/1.1 for
HTTP termination, ALPN h2 for the `g` form. Every change builds new indexes and swaps them in one
assignment on the event loop: a new handshake sees the old set or the new one, and a connection
keeps the context it was accepted with.
"""

from __future__ import annotations

import asyncio
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
    not_after: float = 0.0  # the leaf's expiry, unix seconds
    serial: int = 0         # the leaf's serial number


@dataclass(frozen=True, slots=True)
class ManagedCertificate:
    """A certificate the coordinator sent: its name (the bundle's) and the loaded context."""

    name: str
    loaded: LoadedCertificate


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
    return LoadedCertificate(spec, stamp, tuple(names), http, h2, cert.not_valid_after_utc.timestamp(),
                             cert.serial_number)


class CertificateStore:
    """The certificates in service, indexed by name."""

    def __init__(self, loaded: list[LoadedCertificate] | None = None) -> None:
        self._certs: list[LoadedCertificate] = list(loaded or [])
        self._managed: dict[str, ManagedCertificate] = {}
        self.generation = 0  # bumped by every change of the set (memos of `covers` key on it)
        self._changed: asyncio.Future[None] | None = None  # resolved at the next change (`changed`)
        self._index()

    @classmethod
    def from_specs(cls, specs: tuple[CertificateSpec, ...]) -> CertificateStore:
        return cls([load(s, f"certificates[{i}]") for i, s in enumerate(specs)])

    def _index(self) -> None:
        exact: dict[str, LoadedCertificate] = {}
        wild: dict[str, LoadedCertificate] = {}
        managed = [m.loaded for _, m in sorted(self._managed.items())]
        for c in (*self._certs, *managed):  # files first: for a name in both, the file wins
            for n in c.names:
                if n.startswith("*."):
                    wild.setdefault(n[2:], c)
                else:
                    exact.setdefault(n, c)
        default = self._certs[0] if self._certs else managed[0] if managed else None
        self._exact, self._wild, self._default = exact, wild, default  # one swap: handshakes see old or new
        self.generation += 1
        waiting, self._changed = self._changed, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next change of the set (shared by every waiter; on the event loop)."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    @property
    def empty(self) -> bool:
        return self._default is None

    def names(self) -> list[str]:
        every = (*self._certs, *(m.loaded for m in self._managed.values()))
        return sorted({n for c in every for n in c.names})

    def covers(self, name: str) -> bool:
        """A certificate in service names `name` exactly or by its `*.` wildcard (not the default)."""
        return name in self._exact or ("." in name and name.split(".", 1)[1] in self._wild)

    def context_for(self, server_name: str, *, h2: bool = False) -> ssl.SSLContext | None:
        exact, wild, default = self._exact, self._wild, self._default
        c = exact.get(server_name)
        if c is None and "." in server_name:
            c = wild.get(server_name.split(".", 1)[1])
        if c is None:
            if default is None:
                return None
            c = default
        return c.h2 if h2 else c.http

    def managed(self) -> dict[str, ManagedCertificate]:
        """The managed certificates in service, by name."""
        return dict(self._managed)

    def set_managed(self, certificates: list[ManagedCertificate]) -> None:
        """Serve exactly these managed certificates from the next handshake on (the file ones stay)."""
        self._managed = {m.name: m for m in certificates}
        self._index()

    def expiries(self) -> list[tuple[str, str, float]]:
        """(name, source, not_after) of every certificate in service: a managed one by its name,
        a file one by its first DNS name (`geomesh_gateway_certificate_not_after_seconds`)."""
        out = [(c.names[0], "file", c.not_after) for c in self._certs]
        return out + [(m.name, "managed", m.loaded.not_after) for m in self._managed.values()]

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

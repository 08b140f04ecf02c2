"""TLS for the status page: its serving certificate from the geomesh CA and the server context.

The page's certificate is `server/geomesh-status.pem` in the PKI directory (CN geomesh-status,
SANs localhost, 127.0.0.1, ::1 and each `--server-host`), issued on first use like the
coordinator's; `--cert`/`--key` serve another one instead. The context asks browsers for a client
certificate without requiring one (`CERT_OPTIONAL`): one that is sent must chain to the geomesh
CA, and the role it names is judged in HTTP (`access.decide`), so a browser without one reads a
403 page with the reason instead of a failed handshake.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geomesh.pki import Pki

PAGE_NAME = "geomesh-status"


def page_certificate(pki: Pki, hosts: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(cert, key) of the page's serving certificate, issued by the CA when absent."""
    cert_path = pki.dir / "server" / f"{PAGE_NAME}.pem"
    key_path = pki.dir / "server" / f"{PAGE_NAME}.key"
    if not cert_path.exists():
        sans: list[x509.GeneralName] = [x509.DNSName(PAGE_NAME), x509.DNSName("localhost")]
        for host in ["127.0.0.1", "::1", *hosts]:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PAGE_NAME),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "status")])
        pki._sign(subject, sans, ExtendedKeyUsageOID.SERVER_AUTH, cert_path, key_path)  # the CA's one signer
    return cert_path, key_path


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

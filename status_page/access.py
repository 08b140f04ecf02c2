"""Who may see the status page: the rule, apart from TLS and HTTP.

The HTTPS listener asks for a client certificate but does not require one at the TLS level
(`CERT_OPTIONAL`: a certificate that is sent must chain to the geomesh CA, or the handshake
fails), so a browser without one still gets an answer it can read: 403 with the reason. The
decision is made here from the verified certificate's subject (OU = role, CN = name), as the
coordinator does: admin and dns identities may look; gateways and anything else may not.
Plain HTTP (`--insecure-http`, loopback only) lets every local client look.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from geomesh.errors import UnauthenticatedError
from geomesh.pki import identity_of_pem

VIEWER_ROLES = ("admin", "dns")


@dataclass(frozen=True, slots=True)
class Access:
    allowed: bool
    who: str  # "role/name", "anonymous" or "loopback"
    reason: str  # why not, for the 403 page; empty when allowed


def decide(peer_der: bytes | None, *, tls: bool) -> Access:
    """The verdict for a connection: `peer_der` is the client certificate TLS verified (None when
    the client sent none); `tls` False means the plain loopback listener."""
    if not tls:
        return Access(True, "loopback", "")
    if peer_der is None:
        return Access(False, "anonymous", "no client certificate: the status page needs a geomesh admin or dns "
                      "certificate (issue one with `geomesh pki issue --role admin --name NAME`) imported into the browser")
    try:
        role, name = identity_of_pem(ssl.DER_cert_to_PEM_cert(peer_der).encode())
    except UnauthenticatedError as exc:
        return Access(False, "unknown", f"client certificate refused: {exc}")
    if role not in VIEWER_ROLES:
        return Access(False, f"{role}/{name}", f"certificate role {role!r} ({name}) may not view the status page: "
                      f"it needs one of {', '.join(VIEWER_ROLES)}")
    return Access(True, f"{role}/{name}", "")

"""Client channels to the coordinator: mTLS with a geomesh identity, failover across replicas.

`client_channel` opens one grpc.aio channel to one target; `Targets` rotates through several
coordinator addresses so a gateway or DNS server moves to the next replica when one fails.
Insecure channels exist only for the loopback demo and carry the caller's identity in metadata.
"""

from __future__ import annotations

import grpc

from geomesh.pki import SERVER_NAME, Identity

# keepalives detect a dead coordinator (or a silent partition) within seconds on long streams
CHANNEL_OPTIONS = [
    ("grpc.ssl_target_name_override", SERVER_NAME),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
INSECURE_IDENTITY_HEADER = "x-geomesh-identity"  # "role/name", honoured only by --insecure servers


def client_channel(target: str, identity: Identity | None, *, insecure: bool = False) -> grpc.aio.Channel:
    if insecure:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS[1:])
    if identity is None:
        raise ValueError("an identity is required unless insecure=True")
    ca, cert, key = identity.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)


def insecure_metadata(identity: Identity | None, role: str = "admin", name: str = "admin") -> tuple:
    """Metadata naming the caller to an --insecure coordinator."""
    if identity is not None:
        role, name = identity.role, identity.name
    return ((INSECURE_IDENTITY_HEADER, f"{role}/{name}"),)


class Targets:
    """Round-robin over coordinator addresses: `current`, then `advance()` after a failure."""

    def __init__(self, targets: list[str] | str) -> None:
        items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
        if not items:
            raise ValueError("at least one coordinator address is required")
        self._items = items
        self._i = 0

    @property
    def current(self) -> str:
        return self._items[self._i]

    def advance(self) -> str:
        self._i = (self._i + 1) % len(self._items)
        return self.current

    def __len__(self) -> int:
        return len(self._items)

"""What the coordinator keeps in etcd about the certificates it obtains, and nothing in plaintext.

Three records, JSON under `/geomesh/v1/`:

- `certs/<name>` — `CertificateRecord`: the chain (public), its names, expiry and serial, and the
  private key sealed with the replicas' shared secrets key (`geomesh.sealing.SecretBox`, context
  `cert:<name>:<serial>`). Any replica can open it to seal the key to a gateway (the session does,
  per gateway, at send time: `bundles_for`); nothing per gateway rests anywhere.
- `acme/account` — `AccountRecord`: the ACME account URL and its key, sealed the same way
  (context `acme-account:<directory>`), so a new leader keeps the account.
- `certstatus/<name>` — `RenewalStatus`: the leader's schedule (next attempt, failures in a
  row, the last error), so every replica's `GetOverview` shows whether a renewal is failing.
- `certrequests/<name>` — `CertRequest`: a gateway asked for a custom domain's certificate and
  the coordinator found its TXT record naming an app (`coordinator.cert_requests`); the ordering
  leader orders it and removes it (`coordinator.on_demand_orders`).
- `http01/<token>` — `Http01Record`: an ACME HTTP-01 challenge in flight (token, key
  authorization: public values), bound to the ordering replica's lease; every session sends the
  set to its gateway, whose plain HTTP listener answers it (`coordinator.http01`).

The ordering leader (`acme/leader`, bound to its replica's lease) is elected in `coordinator.acme_orders`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.sealing import SealError, SecretBox, seal

CERTS_DIR = "certs"             # certs/<name>
STATUS_DIR = "certstatus"       # certstatus/<name>
ACME_DIR = "acme"               # acme/leader (the ordering replica), acme/account
HTTP01_DIR = "http01"           # http01/<token>: HTTP-01 challenges every gateway answers
REQUESTS_DIR = "certrequests"   # certrequests/<name>: custom domains' certificates to order on demand


def key_context(name: str, serial: str) -> bytes:
    """The context a certificate's key is sealed under, at rest and to a gateway."""
    return f"cert:{name}:{serial}".encode()


class _Json:
    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, raw: bytes) -> Self:
        data: dict[str, Any] = json.loads(raw)
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fields})


@dataclass(frozen=True, slots=True)
class CertificateRecord(_Json):
    name: str
    dns_names: tuple[str, ...]
    chain_pem: str
    not_after: float
    serial: str
    sealed_key: str  # base64 of the SecretBox blob

    def open_key(self, box: SecretBox) -> bytes:
        """The private key PEM (SealError if the replica's secrets key is not the one it was sealed with)."""
        return box.unseal(base64.b64decode(self.sealed_key), key_context(self.name, self.serial))

    def status(self, plan: RenewalStatus | None) -> pb.CertificateStatus:
        out = pb.CertificateStatus(name=self.name, dns_names=self.dns_names, not_after=int(self.not_after),
                                   serial=self.serial)
        if plan is not None:
            out.renew_at, out.failures, out.last_error = int(plan.renew_at), plan.failures, plan.last_error
        return out


@dataclass(frozen=True, slots=True)
class AccountRecord(_Json):
    directory: str
    uri: str
    sealed_key: str

    @staticmethod
    def context(directory: str) -> bytes:
        return f"acme-account:{directory}".encode()


@dataclass(frozen=True, slots=True)
class RenewalStatus(_Json):
    name: str
    renew_at: float        # unix seconds: the next attempt
    failures: int = 0      # failed attempts in a row
    last_error: str = ""

    def to_proto(self) -> pb.CertificateStatus:
        return pb.CertificateStatus(name=self.name, renew_at=int(self.renew_at), failures=self.failures,
                                    last_error=self.last_error)


@dataclass(frozen=True, slots=True)
class CertRequest(_Json):
    """A custom domain's certificate to order: its TXT record named `app` when `gateway` asked."""

    name: str
    app: str
    gateway: str
    requested_at: float  # unix seconds

    def __post_init__(self) -> None:
        validate.fqdn("name", self.name)
        validate.dns_label("app", self.app)


@dataclass(frozen=True, slots=True)
class Http01Record(_Json):
    """An ACME HTTP-01 challenge: GET /.well-known/acme-challenge/<token> answers key_authorization."""

    token: str
    key_authorization: str

    def __post_init__(self) -> None:
        validate.acme_token("token", self.token)
        validate.key_authorization("key_authorization", self.key_authorization, self.token)

    def to_proto(self) -> pb.HttpChallenge:
        return pb.HttpChallenge(token=self.token, key_authorization=self.key_authorization)


def matches(chain_pem: str, key_pem: bytes) -> bool:
    """The chain's leaf certifies `key_pem`'s public key."""
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return leaf.public_key().public_bytes(*pub) == key.public_key().public_bytes(*pub)


def bundles_for(records: list[CertificateRecord], sealing_public_key: str, box: SecretBox
                ) -> tuple[list[pb.CertificateBundle], list[str]]:
    """Each certificate with its key sealed to one gateway (`sealing_public_key`, base64), and the
    names of those that could not be opened here (wrong secrets key: logged by the caller)."""
    recipient = base64.b64decode(sealing_public_key)
    out, failed = [], []
    for rec in records:
        try:
            key_pem = rec.open_key(box)
        except (SealError, ValueError):
            failed.append(rec.name)
            continue
        out.append(pb.CertificateBundle(
            name=rec.name, dns_names=rec.dns_names, chain_pem=rec.chain_pem, not_after=int(rec.not_after),
            serial=rec.serial, sealed_key=seal(recipient, key_pem, key_context(rec.name, rec.serial))))
        del key_pem
    return out, failed

"""Revoked identities: kept in etcd (`revoked/`), applied by every replica from its cache.

`Admin/RevokeIdentity` revokes one certificate (by serial, as `geomesh pki list` prints it) or a
whole identity (role + name: every certificate of that identity, present and future; to replace
one compromised certificate, issue a new one and revoke the old serial). Revocations are not
undone. A revoked caller is refused with UNAUTHENTICATED ("certificate revoked") on every call,
and `coordinator.access` ends its open streams within moments of the replica's cache seeing the
key. In --insecure mode (no certificates) only identity revocations apply.

`RevocationSet.refuses` is the rule, pure; `Revocations` decodes the cache once per change.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from coordinator.state import State, key
from coordinator.store import Txn
from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import AlreadyExistsError, ValidationError
from geomesh.pki import ROLES

MAX_SERIAL_HEX = 40  # RFC 5280: at most 20 octets
MAX_REASON = 256


def normalise_serial(field: str, text: str) -> str:
    """A serial in lower-case hex without leading zeros; accepts `0x`, upper case and the
    colon-separated form openssl prints."""
    raw = text.strip().lower().removeprefix("0x").replace(":", "")
    if not raw or len(raw) > MAX_SERIAL_HEX or any(c not in "0123456789abcdef" for c in raw):
        raise ValidationError(field, f"{text[:80]!r} is not a certificate serial (hex, at most 20 octets)")
    return format(int(raw, 16), "x")


@dataclass(frozen=True, slots=True)
class Revocation:
    serial: str = ""
    role: str = ""
    name: str = ""
    reason: str = ""
    revoked_by: str = ""
    revoked_at: float = 0.0

    def __post_init__(self) -> None:
        if bool(self.serial) == bool(self.role or self.name):
            raise ValidationError("serial", "give either a serial or a role and name")
        if self.serial:
            object.__setattr__(self, "serial", normalise_serial("serial", self.serial))
        else:
            if self.role not in ROLES:
                raise ValidationError("role", f"{self.role[:80]!r} is not one of {', '.join(ROLES)}")
            validate.dns_label("name", self.name)
        if len(self.reason) > MAX_REASON:
            raise ValidationError("reason", f"is longer than {MAX_REASON} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in self.reason):
            raise ValidationError("reason", "contains control characters")

    @property
    def key_name(self) -> str:
        return f"serial:{self.serial}" if self.serial else f"identity:{self.role}/{self.name}"

    def covers(self, role: str, name: str, serial: str) -> bool:
        """This revocation refuses a caller with that identity and certificate serial."""
        if self.serial:
            return serial == self.serial
        return (role, name) == (self.role, self.name)

    @classmethod
    def from_request(cls, m: pb.RevokeIdentityRequest, revoked_by: str, now: float | None = None) -> Revocation:
        return cls(serial=m.serial, role=m.role, name=m.name, reason=m.reason, revoked_by=revoked_by,
                   revoked_at=time.time() if now is None else now)

    def to_proto(self) -> pb.Revocation:
        return pb.Revocation(serial=self.serial, role=self.role, name=self.name, reason=self.reason,
                             revoked_by=self.revoked_by, revoked_at=self.revoked_at)

    def to_json(self) -> bytes:
        return json.dumps({"serial": self.serial, "role": self.role, "name": self.name, "reason": self.reason,
                           "revoked_by": self.revoked_by, "revoked_at": self.revoked_at}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Revocation:
        d = json.loads(raw)
        return cls(serial=str(d.get("serial", "")), role=str(d.get("role", "")), name=str(d.get("name", "")),
                   reason=str(d.get("reason", "")), revoked_by=str(d.get("revoked_by", "")),
                   revoked_at=float(d.get("revoked_at", 0.0)))


@dataclass(frozen=True, slots=True)
class RevocationSet:
    serials: frozenset[str] = frozenset()
    identities: frozenset[tuple[str, str]] = frozenset()

    def refuses(self, role: str, name: str, serial: str) -> str | None:
        """Why a caller is refused (None: it is not revoked)."""
        if serial and serial in self.serials:
            return f"certificate serial {serial} is revoked"
        if (role, name) in self.identities:
            return f"identity {role}/{name} is revoked"
        return None

    def __bool__(self) -> bool:
        return bool(self.serials or self.identities)


class Revocations:
    """The revocations in the coordinator's cache, decoded once per change of `revoked/`."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._at = -1
        self._items: dict[str, Revocation] = {}
        self._set = RevocationSet()

    def _refresh(self) -> None:
        rev = self.state.dir_revision.get("revoked", 0)
        if rev == self._at:
            return
        items = {}
        for name, kv in self.state.raw["revoked"].items():
            try:
                items[name] = Revocation.from_json(kv.value)
            except (ValueError, KeyError, TypeError, ValidationError):
                continue  # a hand-edited value: not a revocation
        self._items, self._at = items, rev
        self._set = RevocationSet(frozenset(r.serial for r in items.values() if r.serial),
                                  frozenset((r.role, r.name) for r in items.values() if not r.serial))

    @property
    def revision(self) -> int:
        return self.state.dir_revision.get("revoked", 0)

    def current(self) -> RevocationSet:
        self._refresh()
        return self._set

    def all(self) -> list[Revocation]:
        self._refresh()
        return [self._items[k] for k in sorted(self._items)]


def revoke_txn(revocation: Revocation) -> Txn:
    k = key("revoked", revocation.key_name)
    return Txn().absent(k).put(k, revocation.to_json())


def already(revocation: Revocation) -> AlreadyExistsError:
    what = f"serial {revocation.serial}" if revocation.serial else f"identity {revocation.role}/{revocation.name}"
    return AlreadyExistsError(f"{what} is already revoked")

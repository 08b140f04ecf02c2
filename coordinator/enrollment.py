"""Gateway enrollment: which gateway may register, in which region, at which public addresses.

An admin enrolls a gateway (`Admin/EnrollGateway`): `enrollments/<name>` holds its region and the
public addresses it may register with. A gateway identity's `Register` is checked against it
(`check_registration`, pure): no enrollment, another region or an address not enrolled is
PERMISSION_DENIED naming the field, and the record is written in a transaction that compares the
enrollment's revision, so a concurrent re-enrollment cannot be undone by a registration in
flight. The enrollment, not the gateway's self-declared record, is what a gateway identity is
authorised against when it changes instances or reports health (probe finding 2).

Moving a gateway is an admin action: `EnrollGateway` again. When the gateway's record no longer
fits the new enrollment (`fits`), the record is removed (with its mesh address, liveness and
votes, as `RemoveGateway` does): it leaves DNS and the mesh in its old region at once, every
replica ends its open session (NOT_FOUND, see `coordinator.access`) and the gateway registers
again, in the new region. `UnenrollGateway` removes both; the gateway can no longer register.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.operations import Operations
from coordinator.state import State, key
from coordinator.store import Txn
from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import NotFoundError, PermissionDeniedError, PreconditionError, ValidationError
from geomesh.model import Gateway

MAX_ADDRESSES = 16
ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A gateway's enrollment, checked on construction (addresses canonical, no duplicates)."""

    name: str
    region: str
    public_ips: tuple[str, ...]
    mod_revision: int = 0

    def __post_init__(self) -> None:
        validate.dns_label("name", self.name)
        validate.dns_label("region", self.region)
        if not self.public_ips:
            raise ValidationError("public_ips", "at least one public address is required")
        if len(self.public_ips) > MAX_ADDRESSES:
            raise ValidationError("public_ips", f"at most {MAX_ADDRESSES} addresses")
        canonical = tuple(validate.ip_address(f"public_ips[{i}]", ip) for i, ip in enumerate(self.public_ips))
        if len(set(canonical)) != len(canonical):
            raise ValidationError("public_ips", "an address is listed twice")
        object.__setattr__(self, "public_ips", canonical)

    @classmethod
    def from_proto(cls, m: pb.Enrollment) -> Enrollment:
        if len(m.public_ips) > MAX_ADDRESSES:  # before validating each one
            raise ValidationError("public_ips", f"at most {MAX_ADDRESSES} addresses")
        return cls(name=m.name, region=m.region, public_ips=tuple(m.public_ips))

    def to_proto(self) -> pb.Enrollment:
        return pb.Enrollment(name=self.name, region=self.region, public_ips=self.public_ips,
                             mod_revision=self.mod_revision)

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "region": self.region, "public_ips": list(self.public_ips)}).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, mod_revision: int = 0) -> Enrollment:
        d = json.loads(raw)
        return cls(name=d["name"], region=d["region"], public_ips=tuple(d["public_ips"]), mod_revision=mod_revision)


# -- the rules (pure) ------------------------------------------------------------------------

def check_registration(enrollment: Enrollment | None, gw: Gateway) -> None:
    """PermissionDeniedError naming the field when `gw` (a Register request) does not fit."""
    if enrollment is None:
        raise PermissionDeniedError(f"name: gateway {gw.name!r} is not enrolled (an admin calls EnrollGateway)")
    if gw.region != enrollment.region:
        raise PermissionDeniedError(f"region: gateway {gw.name!r} is enrolled in region {enrollment.region!r}, "
                                    f"not {gw.region!r} (moving a gateway is an admin action: EnrollGateway)")
    if gw.public_ip not in enrollment.public_ips:
        raise PermissionDeniedError(f"public_ip: {gw.public_ip} is not an enrolled address of gateway {gw.name!r}")
    if gw.public_ipv6 and gw.public_ipv6 not in enrollment.public_ips:
        raise PermissionDeniedError(f"public_ipv6: {gw.public_ipv6} is not an enrolled address of gateway {gw.name!r}")


def fits(enrollment: Enrollment | None, gw: Gateway) -> bool:
    """The stored record `gw` is one its enrollment admits."""
    try:
        check_registration(enrollment, gw)
    except PermissionDeniedError:
        return False
    return True


def check_region(enrollment: Enrollment | None, name: str, region: str, what: str) -> None:
    """A gateway identity may change `what` only in its enrolled region."""
    if enrollment is None:
        raise PermissionDeniedError(f"gateway {name!r} is not enrolled")
    if region != enrollment.region:
        raise PermissionDeniedError(f"region: gateway {name!r} (enrolled in {enrollment.region}) may not change "
                                    f"{what} in region {region!r}")


# -- the cache view --------------------------------------------------------------------------

class Enrollments:
    """The enrollments in the coordinator's cache, decoded once per change of `enrollments/`."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._at = -1
        self._items: dict[str, Enrollment] = {}

    def all(self) -> Mapping[str, Enrollment]:
        rev = self.state.dir_revision.get("enrollments", 0)
        if rev != self._at:
            items = {}
            for name, kv in self.state.raw["enrollments"].items():
                try:
                    items[name] = Enrollment.from_json(kv.value, mod_revision=kv.mod_revision)
                except (ValueError, KeyError, TypeError, ValidationError):
                    continue  # a hand-edited value: not an enrollment
            self._items, self._at = items, rev
        return self._items

    def get(self, name: str) -> Enrollment | None:
        return self.all().get(name)


# -- the writes ------------------------------------------------------------------------------

class EnrollmentOps:
    """Enrollment writes, each one transaction; record removal goes through `Operations`."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.store = ops.store
        self.state = ops.state

    async def fetch(self, name: str) -> Enrollment | None:
        """The enrollment as etcd has it now (with its revision, for a guarded write)."""
        kv = await self.store.get(key("enrollments", name))
        return None if kv is None else Enrollment.from_json(kv.value, mod_revision=kv.mod_revision)

    async def enroll(self, enrollment: Enrollment) -> tuple[Enrollment, bool]:
        """Create or replace the enrollment (its region must exist, compared in the same
        transaction); returns it and whether the gateway's record was removed for not fitting."""
        ekey = key("enrollments", enrollment.name)
        for _ in range(ATTEMPTS):
            ok, rev = await self.ops._commit(Txn().present(key("regions", enrollment.region))
                                             .put(ekey, enrollment.to_json()))
            if not ok:
                raise NotFoundError(f"region: {enrollment.region!r} does not exist")
            stored = Enrollment(enrollment.name, enrollment.region, enrollment.public_ips, rev)
            removed = await self._remove_unfit(stored)
            if removed is not None:
                return stored, removed
        raise PreconditionError(f"gateway {enrollment.name!r} kept changing while enrolling: retry")

    async def _remove_unfit(self, enrollment: Enrollment) -> bool | None:
        """Remove the gateway's record if it does not fit; None when the enrollment changed
        meanwhile (the caller writes it again)."""
        kv = await self.store.get(key("gateways", enrollment.name))
        if kv is None:
            return False
        if fits(enrollment, Gateway.from_json(kv.value)):
            return False
        await self.state.wait_change(kv.mod_revision - 1, timeout=2.0)
        try:
            await self.ops.remove_gateway(enrollment.name)
        except NotFoundError:
            pass  # removed meanwhile
        current = await self.fetch(enrollment.name)
        if current is None or current.mod_revision != enrollment.mod_revision:
            return None
        return True

    async def unenroll(self, name: str) -> None:
        ok, _ = await self.ops._commit(Txn().present(key("enrollments", name)).delete(key("enrollments", name)))
        if not ok:
            raise NotFoundError(f"gateway {name!r} is not enrolled")
        if name in self.state.gateways:
            try:
                await self.ops.remove_gateway(name)
            except NotFoundError:
                pass

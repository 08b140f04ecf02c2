"""Enrolled gateways (issue 13, probe finding 2) against a real coordinator and etcd.

The probe's reproductions no longer work: a gateway cannot move itself to another region or
address, and cannot write instances of a region it is not enrolled in. Moving is an admin action
(`EnrollGateway` again): the old record leaves and the open session is told to register again.
The rules themselves are table-tested as pure functions below.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from coordinator.access import OpenStream, verdict
from coordinator.enrollment import Enrollment, check_registration
from coordinator.revocation import RevocationSet
from coordinator.rpc_common import Caller
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import PermissionDeniedError, ValidationError
from geomesh.model import Gateway

from .test_admin import KEY, expect, seed
from .test_liveness import open_session

REG = dict(region="eu-central", public_ip="192.0.2.21", wg_port=51820, wg_public_key=KEY, proxy_port=8080)


def _gw(**change) -> Gateway:
    return Gateway(**({"name": "gw-1", "region": "eu-central", "public_ip": "192.0.2.21", "public_ipv6": "",
                       "wg_port": 51820, "wg_public_key": KEY, "mesh_ip": "", "proxy_port": 8080} | change))


ENROLLED = Enrollment("gw-1", "eu-central", ("192.0.2.21", "2001:db8::1"), mod_revision=7)


@pytest.mark.parametrize(("enrollment", "change", "field"), [
    (ENROLLED, {}, None),
    (ENROLLED, {"public_ipv6": "2001:db8::1"}, None),
    (None, {}, "name"),
    (ENROLLED, {"region": "us-east"}, "region"),
    (ENROLLED, {"public_ip": "192.0.2.99"}, "public_ip"),
    (ENROLLED, {"public_ipv6": "2001:db8::2"}, "public_ipv6"),
])
def test_registration_rules(enrollment, change, field):
    if field is None:
        check_registration(enrollment, _gw(**change))
        return
    with pytest.raises(PermissionDeniedError) as info:
        check_registration(enrollment, _gw(**change))
    assert str(info.value).startswith(f"{field}:"), info.value


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"public_ips": ()}, "public_ips"),
    ({"public_ips": ("192.0.2.1", "192.0.2.1")}, "public_ips"),
    ({"public_ips": ("2001:db8::1%" + "x" * 1000,)}, "public_ips[0]"),
    ({"public_ips": tuple(f"192.0.2.{i}" for i in range(17))}, "public_ips"),
    ({"region": "Bad Region"}, "region"),
    ({"name": ""}, "name"),
])
def test_enrollment_is_checked_on_construction(kwargs, field):
    with pytest.raises(ValidationError) as info:
        Enrollment(**({"name": "gw-1", "region": "eu", "public_ips": ("192.0.2.1",)} | kwargs))
    assert info.value.field == field


def test_addresses_are_stored_canonical():
    assert Enrollment("gw-1", "eu", ("2001:DB8:0::1",)).public_ips == ("2001:db8::1",)


@pytest.mark.parametrize(("enrollment", "record", "revoked", "want"), [
    (ENROLLED, _gw(), RevocationSet(), None),
    (ENROLLED, _gw(), RevocationSet(serials=frozenset({"abc"})), "revoked"),
    (ENROLLED, _gw(), RevocationSet(identities=frozenset({("gateway", "gw-1")})), "revoked"),
    (None, _gw(), RevocationSet(), "unenrolled"),
    (Enrollment("gw-1", "us-east", ("192.0.2.21",), mod_revision=9), _gw(), RevocationSet(), "reenrolled"),
    (Enrollment("gw-1", "eu-central", ("192.0.2.21", "192.0.2.22"), mod_revision=9), _gw(), RevocationSet(), None),
    (Enrollment("gw-1", "eu-central", ("192.0.2.21",), mod_revision=9), None, RevocationSet(), "reenrolled"),
    (ENROLLED, None, RevocationSet(), None),  # RemoveGateway alone does not end the session
])
def test_open_stream_verdicts(enrollment, record, revoked, want):
    stream = OpenStream(Caller("gateway", "gw-1", "abc"), "Session", None, None, gateway="gw-1",  # type: ignore[arg-type]
                        enrollment_rev=7)
    got = verdict(stream, revoked, lambda _: enrollment, lambda _: record)
    assert (got.reason if got else None) == want


# -- against the coordinator ---------------------------------------------------------------

async def test_register_only_as_enrolled(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    gc = coordinator.gateway_control("gw-1")
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.Register(pb.RegisterRequest(name="gw-1", **REG)), "name")
    resp = await coordinator.enroll("gw-1", "eu-central", "192.0.2.21", "2001:db8::21")
    assert resp.enrollment.public_ips == ["192.0.2.21", "2001:db8::21"] and not resp.record_removed
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 gc.Register(pb.RegisterRequest(name="gw-1", **(REG | {"region": "us-east"}))), "region")
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 gc.Register(pb.RegisterRequest(name="gw-1", **(REG | {"public_ip": "203.0.113.99"}))), "public_ip")
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 gc.Register(pb.RegisterRequest(name="gw-1", **(REG | {"public_ipv6": "2001:db8::99"}))), "public_ipv6")
    assert not (await admin.ListGateways(pb.ListGatewaysRequest())).gateways
    reg = await gc.Register(pb.RegisterRequest(name="gw-1", **(REG | {"public_ipv6": "2001:db8::21"})))
    assert reg.gateway.region == "eu-central"
    listed = (await admin.ListEnrollments(pb.Empty())).enrollments
    assert [(e.name, e.region) for e in listed] == [("gw-1", "eu-central")] and listed[0].mod_revision > 0


async def test_enrollment_errors(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    await expect(grpc.StatusCode.NOT_FOUND, admin.EnrollGateway(
        pb.Enrollment(name="gw-1", region="mars", public_ips=["192.0.2.1"])), "region")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.EnrollGateway(
        pb.Enrollment(name="gw-1", region="eu-central")), "public_ips")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.EnrollGateway(
        pb.Enrollment(name="gw-1", region="eu-central", public_ips=["2001:db8::1%eth0"])), "public_ips[0]")
    await expect(grpc.StatusCode.NOT_FOUND, admin.UnenrollGateway(pb.DeleteRequest(name="gw-1")))
    gw_admin = coordinator.channel(coordinator.pki.identity("gateway", "gw-1"))
    from geomesh.api import geomesh_pb2_grpc as pbg
    await expect(grpc.StatusCode.PERMISSION_DENIED, pbg.AdminStub(gw_admin).EnrollGateway(
        pb.Enrollment(name="gw-1", region="eu-central", public_ips=["192.0.2.1"])))
    assert not (await admin.ListEnrollments(pb.Empty())).enrollments


async def test_probe_finding_2_a_gateway_cannot_move_itself_or_write_another_region(coordinator):
    """The probe's sequence: Register in eu, Register again in us, then act on us's instances."""
    admin = coordinator.admin()
    await seed(admin)
    await admin.AddInstance(pb.Instance(app="web", id="us1", region="us-east", address="10.1.0.1", port=80))
    await coordinator.enroll("gw-m", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-m")
    await gc.Register(pb.RegisterRequest(name="gw-m", **REG))
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 gc.Register(pb.RegisterRequest(name="gw-m", **(REG | {"region": "us-east"}))), "region")
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.RegisterInstance(
        pb.Instance(app="web", id="hijack-us", region="us-east", address="203.0.113.99", port=80)), "region")
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.DeregisterInstance(pb.InstanceRef(app="web", id="us1")), "region")
    # nothing moved, nothing added or removed
    assert (await admin.GetGateway(pb.GetRequest(name="gw-m"))).region == "eu-central"
    assert [i.id for i in (await admin.ListInstances(pb.ListInstancesRequest())).instances] == ["us1"]
    # its own region still works
    await gc.RegisterInstance(pb.Instance(app="web", id="eu1", region="eu-central", address="10.90.2.9", port=80))


async def test_admin_moves_a_gateway_its_session_is_told_to_register_again(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    await coordinator.enroll("gw-1", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-1")
    first = await gc.Register(pb.RegisterRequest(name="gw-1", **REG))
    session = await open_session(gc, "gw-1")
    assert (await asyncio.wait_for(session.read(), 10)).mesh.snapshot
    # a compatible change (one more address) keeps the record and the session
    resp = await coordinator.enroll("gw-1", "eu-central", "192.0.2.21", "192.0.2.22")
    assert not resp.record_removed
    assert (await admin.GetGateway(pb.GetRequest(name="gw-1"))).mesh_ip == first.gateway.mesh_ip

    async def ended() -> grpc.aio.AioRpcError:
        while True:
            try:
                await session.read()
            except grpc.aio.AioRpcError as exc:
                return exc

    moved = time.monotonic()
    resp = await coordinator.enroll("gw-1", "us-east", "198.51.100.7")
    assert resp.record_removed and resp.enrollment.region == "us-east"
    exc = await asyncio.wait_for(ended(), 3)
    print(f"session of a moved gateway ended {time.monotonic() - moved:.3f} s after EnrollGateway")
    assert exc.code() == grpc.StatusCode.NOT_FOUND and "register again" in exc.details()
    await expect(grpc.StatusCode.NOT_FOUND, admin.GetGateway(pb.GetRequest(name="gw-1")))
    # the gateway registers again, where it was moved to, and acts there only
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.Register(pb.RegisterRequest(name="gw-1", **REG)), "region")
    moved_reg = await gc.Register(pb.RegisterRequest(name="gw-1", **(REG | {"region": "us-east",
                                                                            "public_ip": "198.51.100.7"})))
    assert moved_reg.gateway.region == "us-east"
    await gc.RegisterInstance(pb.Instance(app="web", id="us9", region="us-east", address="10.1.0.9", port=80))
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.RegisterInstance(
        pb.Instance(app="web", id="eu9", region="eu-central", address="10.90.2.9", port=80)), "region")


async def test_unenrolled_gateway_is_removed_and_its_session_ended(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    await coordinator.enroll("gw-1", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-1")
    await gc.Register(pb.RegisterRequest(name="gw-1", **REG))
    session = await open_session(gc, "gw-1")
    await asyncio.wait_for(session.read(), 10)
    await admin.UnenrollGateway(pb.DeleteRequest(name="gw-1"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            await asyncio.wait_for(session.read(), 3)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    await expect(grpc.StatusCode.NOT_FOUND, admin.GetGateway(pb.GetRequest(name="gw-1")))
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.Register(pb.RegisterRequest(name="gw-1", **REG)), "name")


async def test_heartbeat_health_only_in_the_enrolled_region(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    for inst, region, address in (("eu1", "eu-central", "10.90.2.7"), ("us1", "us-east", "10.1.0.1")):
        await admin.AddInstance(pb.Instance(app="web", id=inst, region=region, address=address, port=80, healthy=True))
    await coordinator.enroll("gw-1", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-1")
    await gc.Register(pb.RegisterRequest(name="gw-1", **REG))
    session = await open_session(gc, "gw-1")
    await asyncio.wait_for(session.read(), 10)
    await session.write(pb.SessionUp(heartbeat=pb.Heartbeat(backends=[
        pb.BackendHealth(app="web", instance_id="eu1", healthy=False),
        pb.BackendHealth(app="web", instance_id="us1", healthy=False)])))

    async def health() -> dict[str, bool]:
        return {i.id: i.healthy for i in (await admin.ListInstances(pb.ListInstancesRequest())).instances}

    deadline = time.monotonic() + 5
    while (await health())["eu1"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await health() == {"eu1": False, "us1": True}
    session.cancel()

"""Admin API against a real coordinator process and a real etcd: happy paths and every error code."""

from __future__ import annotations

import grpc
import pytest

from geomesh.api import geomesh_pb2 as pb

KEY = "q" * 43 + "="


async def expect(code: grpc.StatusCode, coro, field: str | None = None) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    if field is not None:
        assert info.value.details().startswith(field), info.value.details()
    return info.value.details()


@pytest.fixture
async def admin(coordinator):
    return coordinator.admin()


async def seed(admin) -> None:
    await admin.CreateRegion(pb.Region(name="eu-central", latitude=50.11, longitude=8.68, display_name="Frankfurt",
                                       instance_subnet="10.90.2.0/24"))
    await admin.CreateRegion(pb.Region(name="us-east", latitude=39.04, longitude=-77.49))
    await admin.CreateApp(pb.App(name="web", lb_policy=pb.LB_POLICY_IP_HASH, pinned_regions=["eu-central"]))


async def test_regions_crud_and_errors(admin):
    r = await admin.CreateRegion(pb.Region(name="eu-central", latitude=50.11, longitude=8.68, display_name="Frankfurt"))
    assert r.name == "eu-central"
    got = await admin.GetRegion(pb.GetRequest(name="eu-central"))
    assert (got.latitude, got.longitude, got.display_name) == (50.11, 8.68, "Frankfurt")
    await admin.CreateRegion(pb.Region(name="us-east", latitude=39.0, longitude=-77.5))
    assert [x.name for x in (await admin.ListRegions(pb.Empty())).regions] == ["eu-central", "us-east"]

    await expect(grpc.StatusCode.ALREADY_EXISTS, admin.CreateRegion(pb.Region(name="eu-central", latitude=1, longitude=1)))
    bad = [
        (pb.Region(name="", latitude=0, longitude=0), "name"),
        (pb.Region(name="Eu_Central", latitude=0, longitude=0), "name"),
        (pb.Region(name="-eu", latitude=0, longitude=0), "name"),
        (pb.Region(name="x" * 64, latitude=0, longitude=0), "name"),
        (pb.Region(name="ok", latitude=90.5, longitude=0), "latitude"),
        (pb.Region(name="ok", latitude=-91, longitude=0), "latitude"),
        (pb.Region(name="ok", latitude=0, longitude=180.01), "longitude"),
        (pb.Region(name="ok", latitude=0, longitude=float("nan")), "longitude"),
        (pb.Region(name="ok", latitude=0, longitude=0, display_name="x" * 65), "display_name"),
        (pb.Region(name="ok", latitude=0, longitude=0, instance_subnet="10.0.0.1/24"), "instance_subnet"),
        (pb.Region(name="ok", latitude=0, longitude=0, instance_subnet="nonsense"), "instance_subnet"),
    ]
    for msg, field in bad:
        await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.CreateRegion(msg), field)
    await expect(grpc.StatusCode.NOT_FOUND, admin.GetRegion(pb.GetRequest(name="nowhere")))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.GetRegion(pb.GetRequest(name="NO")), "name")
    await admin.DeleteRegion(pb.DeleteRequest(name="us-east"))
    await expect(grpc.StatusCode.NOT_FOUND, admin.GetRegion(pb.GetRequest(name="us-east")))
    await expect(grpc.StatusCode.NOT_FOUND, admin.DeleteRegion(pb.DeleteRequest(name="us-east")))


async def test_apps_crud_revision_and_errors(admin):
    await seed(admin)
    app = await admin.GetApp(pb.GetRequest(name="web"))
    assert app.lb_policy == pb.LB_POLICY_IP_HASH and list(app.pinned_regions) == ["eu-central"]
    assert app.mod_revision > 0
    await expect(grpc.StatusCode.ALREADY_EXISTS, admin.CreateApp(pb.App(name="web")))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.CreateApp(pb.App(name="we b")), "name")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.CreateApp(pb.App(name="api", lb_policy=99)), "lb_policy")
    await expect(grpc.StatusCode.INVALID_ARGUMENT,
                 admin.CreateApp(pb.App(name="api", pinned_regions=["eu-central", "eu-central"])), "pinned_regions")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.CreateApp(pb.App(name="api", pinned_regions=["Bad"])),
                 "pinned_regions[0]")
    await expect(grpc.StatusCode.NOT_FOUND, admin.CreateApp(pb.App(name="api", pinned_regions=["mars"])),
                 "pinned_regions[0]")

    updated = await admin.UpdateApp(pb.UpdateAppRequest(
        app=pb.App(name="web", lb_policy=pb.LB_POLICY_LEAST_CONNECTIONS), expected_revision=app.mod_revision))
    assert updated.lb_policy == pb.LB_POLICY_LEAST_CONNECTIONS and updated.mod_revision > app.mod_revision
    # a stale revision is refused, and nothing changes
    await expect(grpc.StatusCode.FAILED_PRECONDITION, admin.UpdateApp(pb.UpdateAppRequest(
        app=pb.App(name="web", lb_policy=pb.LB_POLICY_ROUND_ROBIN), expected_revision=app.mod_revision)))
    assert (await admin.GetApp(pb.GetRequest(name="web"))).lb_policy == pb.LB_POLICY_LEAST_CONNECTIONS
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.UpdateApp(pb.UpdateAppRequest()), "app")
    await expect(grpc.StatusCode.INVALID_ARGUMENT,
                 admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="web"), expected_revision=-1)), "expected_revision")
    await expect(grpc.StatusCode.NOT_FOUND, admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="nope"))))
    assert [a.name for a in (await admin.ListApps(pb.Empty())).apps] == ["web"]

    await admin.AddInstance(pb.Instance(app="web", id="i1", region="eu-central", address="10.90.2.5", port=8000))
    # an app with instances is in use: remove them first (checked inside the delete's transaction)
    details = await expect(grpc.StatusCode.FAILED_PRECONDITION, admin.DeleteApp(pb.DeleteRequest(name="web")))
    assert "web/i1" in details
    await admin.RemoveInstance(pb.InstanceRef(app="web", id="i1"))
    await admin.DeleteApp(pb.DeleteRequest(name="web"))
    await expect(grpc.StatusCode.NOT_FOUND, admin.GetApp(pb.GetRequest(name="web")))
    await expect(grpc.StatusCode.NOT_FOUND, admin.DeleteApp(pb.DeleteRequest(name="web")))


async def test_instances_and_errors(admin):
    await seed(admin)
    inst = pb.Instance(app="web", id="i1", region="eu-central", address="10.90.2.5", port=8000, healthy=True)
    assert (await admin.AddInstance(inst)).address == "10.90.2.5"
    await admin.AddInstance(pb.Instance(app="web", id="i2", region="us-east", address="fd00::5", port=8000))
    await expect(grpc.StatusCode.ALREADY_EXISTS, admin.AddInstance(inst))
    bad = [
        (pb.Instance(app="web", id="i3", region="eu-central", address="10.0.0.300", port=80), "address"),
        (pb.Instance(app="web", id="i3", region="eu-central", address="10.0.0.3", port=0), "port"),
        (pb.Instance(app="web", id="i3", region="eu-central", address="10.0.0.3", port=70000), "port"),
        (pb.Instance(app="web", id="I 3", region="eu-central", address="10.0.0.3", port=80), "id"),
        (pb.Instance(app="", id="i3", region="eu-central", address="10.0.0.3", port=80), "app"),
    ]
    for msg, field in bad:
        await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.AddInstance(msg), field)
    await expect(grpc.StatusCode.NOT_FOUND,
                 admin.AddInstance(pb.Instance(app="nope", id="i3", region="eu-central", address="10.0.0.3", port=80)), "app")
    await expect(grpc.StatusCode.NOT_FOUND,
                 admin.AddInstance(pb.Instance(app="web", id="i3", region="mars", address="10.0.0.3", port=80)), "region")
    listed = await admin.ListInstances(pb.ListInstancesRequest(region="us-east"))
    assert [(i.id, i.address) for i in listed.instances] == [("i2", "fd00::5")]
    assert len((await admin.ListInstances(pb.ListInstancesRequest())).instances) == 2
    # a region in use cannot be deleted
    await expect(grpc.StatusCode.FAILED_PRECONDITION, admin.DeleteRegion(pb.DeleteRequest(name="us-east")))
    await admin.RemoveInstance(pb.InstanceRef(app="web", id="i2"))
    await expect(grpc.StatusCode.NOT_FOUND, admin.RemoveInstance(pb.InstanceRef(app="web", id="i2")))
    await admin.DeleteRegion(pb.DeleteRequest(name="us-east"))


async def test_domains_and_errors(admin):
    await seed(admin)
    d = await admin.AddDomain(pb.Domain(fqdn="Shop.Example.COM.", app="web", port=443))
    assert d.fqdn == "shop.example.com"
    await expect(grpc.StatusCode.ALREADY_EXISTS, admin.AddDomain(pb.Domain(fqdn="shop.example.com", app="web")))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.AddDomain(pb.Domain(fqdn="localhost", app="web")), "fqdn")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.AddDomain(pb.Domain(fqdn="a..b.com", app="web")), "fqdn")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.AddDomain(pb.Domain(fqdn="ok.example.com", app="web", port=65536)), "port")
    await expect(grpc.StatusCode.NOT_FOUND, admin.AddDomain(pb.Domain(fqdn="ok.example.com", app="nope")), "app")
    assert [x.fqdn for x in (await admin.ListDomains(pb.Empty())).domains] == ["shop.example.com"]
    # an app with domains cannot be deleted until they are removed
    await expect(grpc.StatusCode.FAILED_PRECONDITION, admin.DeleteApp(pb.DeleteRequest(name="web")))
    await admin.RemoveDomain(pb.DeleteRequest(name="shop.example.com"))
    await expect(grpc.StatusCode.NOT_FOUND, admin.RemoveDomain(pb.DeleteRequest(name="shop.example.com")))
    await admin.DeleteApp(pb.DeleteRequest(name="web"))


async def test_gateways_list_drain_remove_overview(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    await coordinator.enroll("gw-eu-1", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-eu-1")
    reg = await gc.Register(pb.RegisterRequest(name="gw-eu-1", region="eu-central", public_ip="192.0.2.21",
                                               wg_port=51820, wg_public_key=KEY, proxy_port=8080))
    assert reg.gateway.mesh_ip.startswith("10.88.") and reg.mesh_cidr == "10.88.0.0/16"
    gws = (await admin.ListGateways(pb.ListGatewaysRequest())).gateways
    assert [(g.name, g.alive, g.state) for g in gws] == [("gw-eu-1", False, pb.GATEWAY_STATE_ACTIVE)]
    assert not (await admin.ListGateways(pb.ListGatewaysRequest(region="us-east"))).gateways
    drained = await admin.DrainGateway(pb.GetRequest(name="gw-eu-1"))
    assert drained.state == pb.GATEWAY_STATE_DRAINING
    assert (await admin.GetGateway(pb.GetRequest(name="gw-eu-1"))).state == pb.GATEWAY_STATE_DRAINING
    assert (await admin.ActivateGateway(pb.GetRequest(name="gw-eu-1"))).state == pb.GATEWAY_STATE_ACTIVE
    ov = await admin.GetOverview(pb.Empty())
    eu = next(r for r in ov.regions if r.region.name == "eu-central")
    assert (eu.gateways, eu.gateways_alive) == (1, 0) and ov.apps == 1
    await expect(grpc.StatusCode.NOT_FOUND, admin.DrainGateway(pb.GetRequest(name="gw-x")))
    await admin.RemoveGateway(pb.DeleteRequest(name="gw-eu-1"))
    await expect(grpc.StatusCode.NOT_FOUND, admin.GetGateway(pb.GetRequest(name="gw-eu-1")))
    await expect(grpc.StatusCode.NOT_FOUND, admin.RemoveGateway(pb.DeleteRequest(name="gw-eu-1")))


async def test_register_validation(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    gc = coordinator.gateway_control("gw-eu-1")
    good = dict(name="gw-eu-1", region="eu-central", public_ip="192.0.2.21", wg_port=51820, wg_public_key=KEY, proxy_port=8080)
    for change, field in [({"public_ip": "192.0.2"}, "public_ip"), ({"public_ip": "2001:db8::1"}, "public_ip"),
                          ({"wg_port": 0}, "wg_port"), ({"wg_public_key": "abc"}, "wg_public_key"),
                          ({"wg_public_key": "AAAA"}, "wg_public_key"), ({"proxy_port": 99999}, "proxy_port"),
                          ({"public_ipv6": "10.0.0.1"}, "public_ipv6")]:
        await expect(grpc.StatusCode.INVALID_ARGUMENT, gc.Register(pb.RegisterRequest(**(good | change))), field)
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.Register(pb.RegisterRequest(**good)), "name")  # not enrolled
    await coordinator.enroll("gw-eu-1", "eu-central", "192.0.2.21", "192.0.2.22")
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.Register(pb.RegisterRequest(**(good | {"region": "mars"}))), "region")
    first = await gc.Register(pb.RegisterRequest(**good))
    # re-registering (restart, new endpoint) keeps the mesh IP
    again = await gc.Register(pb.RegisterRequest(**(good | {"public_ip": "192.0.2.22"})))
    assert again.gateway.mesh_ip == first.gateway.mesh_ip and again.gateway.public_ip == "192.0.2.22"

"""mTLS and roles: who may call what. Every refusal has its own code and changes nothing."""

from __future__ import annotations

import grpc
import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import CHANNEL_OPTIONS
from geomesh.pki import Pki

from .test_admin import KEY, expect, seed

REG = dict(region="eu-central", public_ip="192.0.2.21", wg_port=51820, wg_public_key=KEY, proxy_port=8080)


async def test_no_client_certificate_is_refused_at_the_handshake(coordinator):
    creds = grpc.ssl_channel_credentials(root_certificates=coordinator.pki.ca_cert_path.read_bytes())
    async with grpc.aio.secure_channel(coordinator.address, creds, options=CHANNEL_OPTIONS) as ch:
        await expect(grpc.StatusCode.UNAVAILABLE,
                     pbg.AdminStub(ch).CreateRegion(pb.Region(name="x", latitude=0, longitude=0), timeout=5))
    assert not (await coordinator.admin().ListRegions(pb.Empty())).regions


async def test_plaintext_client_is_refused(coordinator):
    async with grpc.aio.insecure_channel(coordinator.address) as ch:
        await expect(grpc.StatusCode.UNAVAILABLE, pbg.AdminStub(ch).ListRegions(pb.Empty(), timeout=5))


async def test_certificate_from_another_ca_is_refused(coordinator, tmp_path):
    rogue = Pki(tmp_path / "rogue")
    rogue.init()
    ident = rogue.issue("admin", "root")
    _, cert, key = ident.read()
    creds = grpc.ssl_channel_credentials(root_certificates=coordinator.pki.ca_cert_path.read_bytes(),
                                         private_key=key, certificate_chain=cert)
    async with grpc.aio.secure_channel(coordinator.address, creds, options=CHANNEL_OPTIONS) as ch:
        await expect(grpc.StatusCode.UNAVAILABLE,
                     pbg.AdminStub(ch).CreateRegion(pb.Region(name="x", latitude=0, longitude=0), timeout=5))
    assert not (await coordinator.admin().ListRegions(pb.Empty())).regions


async def test_gateway_may_change_only_itself(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    await admin.CreateRegion(pb.Region(name="ap-northeast", latitude=35.7, longitude=139.7))
    await coordinator.enroll("gw-1", "eu-central", "192.0.2.21")
    await coordinator.enroll("gw-2", "eu-central", "192.0.2.21")
    gw1 = coordinator.gateway_control("gw-1")
    await gw1.Register(pb.RegisterRequest(name="gw-1", **REG))
    # registering under another gateway's name
    await expect(grpc.StatusCode.PERMISSION_DENIED, gw1.Register(pb.RegisterRequest(name="gw-2", **REG)))
    # admin calls: apps, drain, remove
    gw_admin = pbg.AdminStub(coordinator.channel(coordinator.pki.identity("gateway", "gw-1")))
    await expect(grpc.StatusCode.PERMISSION_DENIED, gw_admin.CreateApp(pb.App(name="evil")))
    await expect(grpc.StatusCode.PERMISSION_DENIED, gw_admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="web"))))
    await expect(grpc.StatusCode.PERMISSION_DENIED, gw_admin.DrainGateway(pb.GetRequest(name="gw-1")))
    await expect(grpc.StatusCode.PERMISSION_DENIED, gw_admin.RemoveGateway(pb.DeleteRequest(name="gw-1")))
    # instances of another region
    await expect(grpc.StatusCode.PERMISSION_DENIED, gw1.RegisterInstance(
        pb.Instance(app="web", id="i9", region="ap-northeast", address="10.0.0.9", port=80)))
    ok = await gw1.RegisterInstance(pb.Instance(app="web", id="i1", region="eu-central", address="10.0.0.1", port=80))
    assert ok.id == "i1"
    # a session opened in another gateway's name
    call = gw1.Session()
    await call.write(pb.SessionUp(hello=pb.SessionHello(name="gw-2")))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # nothing changed
    app = await admin.GetApp(pb.GetRequest(name="web"))
    assert app.lb_policy == pb.LB_POLICY_IP_HASH
    assert [g.name for g in (await admin.ListGateways(pb.ListGatewaysRequest())).gateways] == ["gw-1"]
    assert [i.id for i in (await admin.ListInstances(pb.ListInstancesRequest())).instances] == ["i1"]


async def test_dns_identity_may_only_read_the_feed(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    dns_ch = coordinator.channel(coordinator.pki.identity("dns", "dns1"))
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 pbg.AdminStub(dns_ch).CreateRegion(pb.Region(name="x", latitude=0, longitude=0)))
    await expect(grpc.StatusCode.PERMISSION_DENIED, pbg.AdminStub(dns_ch).ListRegions(pb.Empty()))
    await expect(grpc.StatusCode.PERMISSION_DENIED,
                 pbg.GatewayControlStub(dns_ch).Register(pb.RegisterRequest(name="dns1", **REG)))
    await expect(grpc.StatusCode.PERMISSION_DENIED, pbg.GatewayControlStub(dns_ch).RegisterInstance(
        pb.Instance(app="web", id="i1", region="eu-central", address="10.0.0.1", port=80)))
    feed = pbg.RoutingFeedStub(dns_ch).Watch(pb.WatchRoutingRequest())
    first = await feed.read()
    assert first.snapshot and {r.WhichOneof("kind") for r in first.upserts} == {"region", "app"}
    feed.cancel()
    assert len((await admin.ListRegions(pb.Empty())).regions) == 2


async def test_certificate_with_unknown_role_is_unauthenticated(coordinator, tmp_path):
    # same CA, but a subject without a geomesh role: identity_of_pem refuses it
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki = coordinator.pki
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    cert_path, key_path = tmp_path / "s.pem", tmp_path / "s.key"
    pki._sign(subject, [], ExtendedKeyUsageOID.CLIENT_AUTH, cert_path, key_path)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert_path.read_bytes(),
                                         private_key=key_path.read_bytes(), certificate_chain=cert_path.read_bytes())
    async with grpc.aio.secure_channel(coordinator.address, creds, options=CHANNEL_OPTIONS) as ch:
        await expect(grpc.StatusCode.UNAUTHENTICATED, pbg.AdminStub(ch).ListRegions(pb.Empty(), timeout=5))

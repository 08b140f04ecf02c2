"""mTLS and roles: who may call what. Every refusal has its own code and changes nothing."""

from __future__ import annotations

import asyncio

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


# -- client chains under the CA's constraints (probe finding 23) -------------------------------

def _client_cert(pki, tmp_path, tag: str, *, ous=("admin",), eku=True, via_intermediate=False):
    """A client certificate from the test CA (or from an intermediate CA under it), built by hand
    to break one rule at a time; returns channel credentials presenting it (and the chain)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key_path.read_bytes(), password=None)
    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, issuer_key, key, *, ca: bool, usage: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False, data_encipherment=False,
                                              key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    chain = b""
    issuer, issuer_key = ca_cert.subject, ca_key
    if via_intermediate:
        ikey = ec.generate_private_key(ec.SECP256R1())
        inter = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rogue intermediate {tag}")]),
                      ca_cert.subject, ca_key, ikey, ca=True, usage=False)
        chain = inter.public_bytes(serialization.Encoding.PEM)
        issuer, issuer_key = inter.subject, ikey
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mallory-{tag}"),
                         *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous)])
    leaf = build(subject, issuer, issuer_key, key, ca=False, usage=eku)
    pem = leaf.public_bytes(serialization.Encoding.PEM) + chain
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return grpc.ssl_channel_credentials(root_certificates=pki.ca_cert_path.read_bytes(), private_key=key_pem,
                                        certificate_chain=pem)


@pytest.mark.parametrize(("tag", "kwargs", "why"), [
    ("inter", {"via_intermediate": True}, "pathLenConstraint 0"),
    ("noeku", {"eku": False}, "extended key usage"),
    ("twoou", {"ous": ("admin", "gateway")}, "2 OUs"),
    ("twoou-rev", {"ous": ("gateway", "admin")}, "2 OUs"),
])
async def test_client_chain_outside_the_cas_constraints_is_refused(coordinator, tmp_path, tag, kwargs, why):
    creds = _client_cert(coordinator.pki, tmp_path, tag, **kwargs)
    async with grpc.aio.secure_channel(coordinator.address, creds, options=CHANNEL_OPTIONS) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pbg.AdminStub(ch).CreateRegion(pb.Region(name="x", latitude=0, longitude=0), timeout=5)
    # the handshake may refuse the chain itself (UNAVAILABLE); if it passes, the coordinator does
    code, details = info.value.code(), info.value.details()
    assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE), (code, details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        assert why in details, details
    assert not (await coordinator.admin().ListRegions(pb.Empty())).regions
    # the same rules, well-formed, are accepted
    good = _client_cert(coordinator.pki, tmp_path, f"{tag}-good")
    async with grpc.aio.secure_channel(coordinator.address, good, options=CHANNEL_OPTIONS) as ch:
        assert (await pbg.AdminStub(ch).ListRegions(pb.Empty(), timeout=5)).regions == []


async def test_coordinator_needs_no_ca_key(coordinator_factory, pki, tmp_path):
    import shutil

    bare = tmp_path / "coordinator-host"
    bare.mkdir()
    shutil.copy(pki.ca_cert_path, bare / "ca.pem")
    shutil.copytree(pki.dir / "server", bare / "server")
    assert not (bare / "ca.key").exists()
    c = coordinator_factory("--pki-dir", str(bare))  # the last --pki-dir wins
    await c.admin().CreateRegion(pb.Region(name="eu", latitude=1, longitude=2))
    assert not (bare / "ca.key").exists() and "CA key is on this host" not in c.log()
    assert sorted(p.name for p in (bare / "server").iterdir()) == sorted(p.name for p in (pki.dir / "server").iterdir())


def test_coordinator_without_its_serving_certificate_does_not_issue_one(pki, tmp_path):
    import shutil
    import subprocess
    import sys

    bare = tmp_path / "no-server-cert"
    bare.mkdir()
    shutil.copy(pki.ca_cert_path, bare / "ca.pem")
    shutil.copy(pki.ca_key_path, bare / "ca.key")  # even with the CA key at hand it issues nothing
    proc = subprocess.run([sys.executable, "-m", "coordinator.main", "--pki-dir", str(bare), "--etcd", "127.0.0.1:9",
                           "--listen", "127.0.0.1:0", "--etcd-timeout", "0.2"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "pki_dir:" in proc.stderr and "geomesh pki init" in proc.stderr, proc.stderr
    assert not (bare / "server").exists()


# -- status codes of bad input (probe finding 22) ----------------------------------------------

def _raw_unary(ch: grpc.aio.Channel, method: str):
    return ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


@pytest.mark.parametrize("body", [b"\x0a\x02\xff\xfe", b"\x0a\x80", b"\x11\x00", b"\xff\xff\xff\xff\xff\xff"])
async def test_malformed_protobuf_is_invalid_argument(coordinator, body):
    ch = coordinator.channel(coordinator.pki.identity("admin", "root"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw_unary(ch, "/geomesh.v1.Admin/CreateRegion")(body, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith("request: not a valid CreateRegion request message")
    assert "DecodeError" not in info.value.details() and "<class" not in info.value.details()


async def test_garbage_on_session_is_invalid_argument_without_an_error_log(coordinator):
    import random

    admin = coordinator.admin()
    await seed(admin)
    ch = coordinator.channel(coordinator.pki.identity("gateway", "gw-g"))
    session = ch.stream_stream("/geomesh.v1.GatewayControl/Session", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    for garbage in (b"\x0a\xff\x01", random.Random(13).randbytes(64), b"\x12\x05\x0a\x03\xff\xfe\xfd"):
        call = session()
        await call.write(garbage)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    # a good hello, then garbage instead of a heartbeat
    await coordinator.enroll("gw-g", "eu-central", "192.0.2.21")
    await pbg.GatewayControlStub(ch).Register(pb.RegisterRequest(name="gw-g", **REG))
    call = session()
    await call.write(pb.SessionUp(hello=pb.SessionHello(name="gw-g")).SerializeToString())
    await asyncio.wait_for(call.read(), 10)
    await call.write(b"\x12\x80")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            await asyncio.wait_for(call.read(), 10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    errors = [line for line in coordinator.log().splitlines() if '"level": "error"' in line or "Traceback" in line]
    assert not errors, errors[:3]


async def test_clients_leaving_streams_mid_send_are_not_errors(coordinator, etcd):
    """Watchers that read a bit of a large snapshot and go away (the probe saw ExecuteBatchError
    tracebacks at error level for this)."""
    from .test_abuse import fill_instances, wait_revision

    admin = coordinator.admin()
    await seed(admin)
    await wait_revision(admin, await fill_instances(etcd.endpoint, "web", 2000))
    feed = coordinator.routing_feed()
    for _ in range(3):
        calls = [feed.Watch(pb.WatchRoutingRequest()) for _ in range(20)]
        await asyncio.gather(*(c.initial_metadata() for c in calls))
        await asyncio.sleep(0.05)
        for c in calls:
            c.cancel()
        await admin.CreateRegion(pb.Region(name=f"r{_}", latitude=0, longitude=0))  # a change to send
    await asyncio.sleep(0.5)
    assert (await admin.GetApp(pb.GetRequest(name="web"))).name == "web"
    errors = [line for line in coordinator.log().splitlines() if '"level": "error"' in line or "Traceback" in line]
    assert not errors, errors[:3]


def test_etcd_request_too_large_names_the_limit():
    from coordinator.rpc_common import translate
    from geomesh.errors import ValidationError

    for code, details in ((grpc.StatusCode.RESOURCE_EXHAUSTED, "grpc: received message larger than max"),
                          (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large")):
        exc = translate(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details))
        assert isinstance(exc, ValidationError) and exc.field == "request" and "--max-request-bytes" in str(exc)
    other = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 "etcdserver: duplicate key given in txn request")
    assert translate(other) is other  # not the caller's doing: INTERNAL, logged


# -- the audit log of writes --------------------------------------------------------------------

async def test_every_write_is_an_audit_line_and_counted(coordinator_factory, tmp_path):
    import json
    import urllib.request

    from cryptography import x509

    from geomesh.lab.processes import free_port
    from geomesh.pki import serial_hex

    port = free_port()
    audit_file = tmp_path / "audit.jsonl"
    c = coordinator_factory("--metrics-port", str(port), "--audit-log", str(audit_file), "--log-format", "text")
    admin = c.admin("auditor")
    await seed(admin)
    await admin.ListRegions(pb.Empty())  # a read: no audit line
    await c.enroll("gw-1", "eu-central", "192.0.2.21")
    gc = c.gateway_control("gw-1")
    await gc.Register(pb.RegisterRequest(name="gw-1", **REG))
    await expect(grpc.StatusCode.PERMISSION_DENIED, gc.RegisterInstance(
        pb.Instance(app="web", id="x1", region="us-east", address="10.1.0.1", port=80)))
    await admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="web")))
    lines = [json.loads(x) for x in audit_file.read_text().splitlines()]
    assert all(x["audit"] is True and x["logger"] == "geomesh.audit" for x in lines)
    got = [(x["method"], x["role"], x["caller"], x["code"]) for x in lines]
    assert got == [("CreateRegion", "admin", "auditor", "OK"), ("CreateRegion", "admin", "auditor", "OK"),
                   ("CreateApp", "admin", "auditor", "OK"), ("EnrollGateway", "admin", "root", "OK"),
                   ("Register", "gateway", "gw-1", "OK"), ("RegisterInstance", "gateway", "gw-1", "PERMISSION_DENIED"),
                   ("UpdateApp", "admin", "auditor", "OK")]
    serial = serial_hex(x509.load_pem_x509_certificate(c.pki.identity("gateway", "gw-1").cert.read_bytes()).serial_number)
    register = lines[4]
    assert register["serial"] == serial
    assert register["request"] == {"name": "gw-1", "region": "eu-central", "public_ip": "192.0.2.21"}
    assert lines[5]["request"] == {"app": "web", "id": "x1", "region": "us-east", "address": "10.1.0.1", "port": 80}
    assert lines[6]["request"] == {"app.name": "web"}
    assert lines[3]["request"] == {"name": "gw-1", "region": "eu-central", "public_ips": ["192.0.2.21"]}
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'geomesh_coordinator_writes_total{method="CreateRegion",role="admin"} 2.0' in text
    assert 'geomesh_coordinator_writes_total{method="Register",role="gateway"} 1.0' in text
    assert 'method="RegisterInstance",role="gateway"' not in text  # refused: an audit line, not a write
    # the process log (text format here) carries the same lines
    assert c.log().count("geomesh.audit: write") == len(lines)


@pytest.mark.parametrize(("msg", "exc", "passes"), [
    ("ExecuteBatchError raised in core by servicer method [/geomesh.v1.RoutingFeed/Watch]", None, False),
    ("Unexpected error", "ExecuteBatchError", False),
    ("something else", None, True),
    ("something else", "ValueError", True),
])
def test_client_gone_filter(msg, exc, passes):
    import logging
    import sys

    from coordinator.rpc_common import ClientGoneFilter

    exc_info = None
    if exc is not None:
        cls = type(exc, (Exception,), {})
        try:
            raise cls("x")
        except Exception:  # noqa: BLE001
            exc_info = sys.exc_info()
    record = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, msg, (), exc_info)
    assert ClientGoneFilter().filter(record) is passes
    assert record.levelno == (logging.ERROR if passes else logging.DEBUG)

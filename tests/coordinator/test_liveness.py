"""Gateway registration races, liveness through leases, and the revisioned streams."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import aetcd
import grpc

from geomesh.api import geomesh_pb2 as pb

from .test_admin import KEY, seed

REG = dict(region="eu-central", public_ip="192.0.2.21", wg_port=51820, wg_public_key=KEY, proxy_port=8080)


def gw_key(i: int) -> str:
    # distinct valid base64 keys (32 bytes)
    import base64
    return base64.b64encode(i.to_bytes(32, "big")).decode()


async def test_50_concurrent_registrations_on_two_replicas_get_distinct_mesh_ips(coordinator_factory, etcd):
    c1 = coordinator_factory()
    c2 = coordinator_factory()
    await seed(c1.admin())
    await asyncio.sleep(0)  # c2 learns the region through its own watch
    names = [f"gw-{i:02d}" for i in range(50)]
    await asyncio.gather(*(c1.enroll(n, "eu-central", "192.0.2.21") for n in names))
    stubs = [(c1 if i % 2 else c2).gateway_control(n) for i, n in enumerate(names)]

    async def register(i: int, stub) -> pb.RegisterResponse:
        for _ in range(50):  # c2 may not have seen the region yet: retry on NOT_FOUND only
            try:
                return await stub.Register(pb.RegisterRequest(name=names[i], **(REG | {"wg_public_key": gw_key(i + 1)})),
                                           timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                await asyncio.sleep(0.05)
        raise AssertionError("region never reached the second replica")

    results = await asyncio.gather(*(register(i, s) for i, s in enumerate(stubs)))
    ips = [r.gateway.mesh_ip for r in results]
    assert len(set(ips)) == 50, "duplicate mesh IPs handed out"
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.88.0.0/16") for ip in ips)
    # etcd agrees: one ipam claim per gateway, pointing at that gateway
    host, port = etcd.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port)) as client:
        claims = {kv.key.decode().rsplit("/", 1)[1]: kv.value.decode()
                  async for kv in _iter(await client.get_prefix(b"/geomesh/v1/ipam/"))}
    assert claims == {r.gateway.mesh_ip: r.gateway.name for r in results}
    # both replicas list the same 50
    for c in (c1, c2):
        listed = (await c.admin().ListGateways(pb.ListGatewaysRequest())).gateways
        assert sorted((g.name, g.mesh_ip) for g in listed) == sorted((r.gateway.name, r.gateway.mesh_ip) for r in results)


async def _iter(rng):
    for kv in rng:
        yield kv


async def open_session(stub, name: str, last_revision: int = 0):
    call = stub.Session()
    await call.write(pb.SessionUp(hello=pb.SessionHello(name=name, last_revision=last_revision)))
    return call


async def next_gateway_state(feed, name: str, want_alive: bool, table: dict) -> None:
    while table.get(name) != want_alive:
        update = await feed.read()
        assert update is not grpc.aio.EOF
        if update.snapshot:
            table.clear()
        for r in update.upserts:
            if r.WhichOneof("kind") == "gateway":
                table[r.gateway.name] = r.gateway.alive
        for k in update.removals:
            table.pop(k.name, None)


async def test_cut_session_leaves_alive_set_in_under_a_second(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    await coordinator.enroll("gw-1", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-1")
    await gc.Register(pb.RegisterRequest(name="gw-1", **REG))
    feed = coordinator.routing_feed().Watch(pb.WatchRoutingRequest())
    table: dict[str, bool] = {}
    session = await open_session(gc, "gw-1")
    first = await session.read()
    assert first.routing.snapshot and first.mesh.snapshot
    await asyncio.wait_for(next_gateway_state(feed, "gw-1", True, table), 10)
    assert (await admin.GetGateway(pb.GetRequest(name="gw-1"))).alive

    cut = time.monotonic()
    session.cancel()  # the gateway's stream dies (crash, connection reset)
    await asyncio.wait_for(next_gateway_state(feed, "gw-1", False, table), 10)
    elapsed = time.monotonic() - cut
    assert elapsed < 1.0, f"gateway stayed alive {elapsed:.3f}s after its stream was cut"
    assert not (await admin.GetGateway(pb.GetRequest(name="gw-1"))).alive
    feed.cancel()


async def test_session_sends_snapshot_then_one_peer_per_join_and_resumes(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    gcs = {n: coordinator.gateway_control(n) for n in ("gw-a", "gw-b", "gw-c")}
    for n in gcs:
        await coordinator.enroll(n, "us-east" if n == "gw-a" else "eu-central", "192.0.2.21")
    for i, (n, gc) in enumerate(gcs.items()):
        if n != "gw-c":  # gw-a in us-east, gw-b in eu-central
            region = {"region": "us-east"} if n == "gw-a" else {}
            await gc.Register(pb.RegisterRequest(name=n, **(REG | region | {"wg_public_key": gw_key(i + 1)})))
    session = await open_session(gcs["gw-a"], "gw-a")
    snap = await session.read()
    assert snap.mesh.snapshot and [p.name for p in snap.mesh.upserts] == ["gw-b"]
    peer = snap.mesh.upserts[0]
    assert peer.endpoint == "192.0.2.21:51820" and peer.allowed_ips[0].endswith("/32")
    # eu-central's instance subnet rides on its first gateway, towards other regions only
    assert list(peer.allowed_ips)[1:] == ["10.90.2.0/24"]

    await gcs["gw-c"].Register(pb.RegisterRequest(name="gw-c", **(REG | {"wg_public_key": gw_key(3)})))
    delta = await asyncio.wait_for(session.read(), 10)
    # gw-c joins eu-central: exactly one new peer (gw-b keeps carrying the region's subnet)
    assert not delta.mesh.snapshot and [p.name for p in delta.mesh.upserts] == ["gw-c"]
    assert len(delta.mesh.upserts[0].allowed_ips) == 1
    last = delta.revision
    session.cancel()

    # while gw-a is away: gw-b is removed and an instance added
    await admin.RemoveGateway(pb.DeleteRequest(name="gw-b"))
    await admin.AddInstance(pb.Instance(app="web", id="i1", region="eu-central", address="10.90.2.7", port=80))
    resumed = await open_session(gcs["gw-a"], "gw-a", last_revision=last)
    msg = await asyncio.wait_for(resumed.read(), 10)
    assert not msg.mesh.snapshot and list(msg.mesh.removals) == ["gw-b"]
    # gw-c inherits eu-central's instance subnet from the removed gw-b
    assert [(p.name, list(p.allowed_ips)[1:]) for p in msg.mesh.upserts] == [("gw-c", ["10.90.2.0/24"])]
    assert not msg.routing.snapshot
    kinds = sorted(r.WhichOneof("kind") for r in msg.routing.upserts)
    assert "instance" in kinds and "region" not in kinds  # only what it missed
    assert [k.name for k in msg.routing.removals] == ["gw-b"]
    resumed.cancel()


async def test_routing_feed_snapshot_delta_and_resume(coordinator_factory):
    coordinator = coordinator_factory()
    admin = coordinator.admin()
    await seed(admin)
    feed = coordinator.routing_feed().Watch(pb.WatchRoutingRequest())
    snap = await feed.read()
    assert snap.snapshot and len(snap.upserts) == 3
    await admin.AddInstance(pb.Instance(app="web", id="i1", region="eu-central", address="10.90.2.7", port=80))
    delta = await asyncio.wait_for(feed.read(), 10)
    assert not delta.snapshot and [r.instance.id for r in delta.upserts] == ["i1"] and delta.revision > snap.revision
    feed.cancel()
    await admin.RemoveInstance(pb.InstanceRef(app="web", id="i1"))
    again = coordinator.routing_feed().Watch(pb.WatchRoutingRequest(last_revision=delta.revision))
    missed = await asyncio.wait_for(again.read(), 10)
    assert not missed.snapshot and not missed.upserts and [k.name for k in missed.removals] == ["web/i1"]
    again.cancel()
    # a replica started later has no history before its start: an older revision gets a snapshot
    late = coordinator_factory()
    old = late.routing_feed().Watch(pb.WatchRoutingRequest(last_revision=snap.revision))
    resent = await asyncio.wait_for(old.read(), 10)
    assert resent.snapshot and resent.revision >= missed.revision
    assert sorted(r.WhichOneof("kind") for r in resent.upserts) == ["app", "region", "region"]
    old.cancel()

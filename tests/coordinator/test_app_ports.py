"""`App.ports` through a real coordinator and etcd (probe finding 15): validated on create and
update (INVALID_ARGUMENT naming `ports[i]`), stored, returned, and carried by the routing feed the
gateways build their port allow-list from."""

from __future__ import annotations

import asyncio

import grpc

from geomesh.api import geomesh_pb2 as pb

from .test_admin import expect, seed


async def test_app_ports_are_validated_stored_and_fed_to_the_gateways(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    bad = [
        ([0], "ports[0]", "0 is not a port (1-65535)"),
        ([443, 70000], "ports[1]", "70000 is not a port"),
        ([443, 8443, 443], "ports[2]", "port 443 is listed twice"),
        (list(range(1, 66)), "ports", "has 65 entries, at most 64"),
    ]
    for ports, field, words in bad:
        details = await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.CreateApp(pb.App(name="api", ports=ports)),
                               f"{field}:")
        assert words in details, details
        details = await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.UpdateApp(pb.UpdateAppRequest(
            app=pb.App(name="web", ports=ports))), f"app.{field}:")
        assert words in details, details
    await expect(grpc.StatusCode.NOT_FOUND, admin.GetApp(pb.GetRequest(name="api")))  # nothing was created

    created = await admin.CreateApp(pb.App(name="api", ports=[8443, 9000]))
    assert list(created.ports) == [8443, 9000]
    assert list((await admin.GetApp(pb.GetRequest(name="api"))).ports) == [8443, 9000]
    assert list((await admin.GetApp(pb.GetRequest(name="web"))).ports) == []  # the default: instance ports only

    feed = coordinator.routing_feed().Watch(pb.WatchRoutingRequest())
    try:
        snap = await asyncio.wait_for(feed.read(), 10)
        apps = {r.app.name: list(r.app.ports) for r in snap.upserts if r.WhichOneof("kind") == "app"}
        assert apps == {"web": [], "api": [8443, 9000]}
        updated = await admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="api", ports=[9000]),
                                                             expected_revision=created.mod_revision))
        assert list(updated.ports) == [9000]
        delta = await asyncio.wait_for(feed.read(), 10)
        assert [(r.app.name, list(r.app.ports)) for r in delta.upserts] == [("api", [9000])]
    finally:
        feed.cancel()
    assert [(a.name, list(a.ports)) for a in (await admin.ListApps(pb.Empty())).apps] == [("api", [9000]), ("web", [])]

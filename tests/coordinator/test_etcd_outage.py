"""etcd goes away under a running coordinator: reads from cache, writes UNAVAILABLE, no event lost."""

from __future__ import annotations

import asyncio
import time

import aetcd
import grpc

from geomesh.api import geomesh_pb2 as pb
from geomesh.model import Region

from .test_admin import expect, seed


async def test_etcd_restart_under_running_coordinator(coordinator, etcd):
    admin = coordinator.admin()
    await seed(admin)
    feed = coordinator.routing_feed().Watch(pb.WatchRoutingRequest())
    snap = await feed.read()
    assert snap.snapshot

    etcd.stop()
    # reads are served from the cache
    regions = await admin.ListRegions(pb.Empty(), timeout=5)
    assert [r.name for r in regions.regions] == ["eu-central", "us-east"]
    assert (await admin.GetApp(pb.GetRequest(name="web"), timeout=5)).name == "web"
    # writes fail fast and clearly, never hang
    start = time.monotonic()
    detail = await expect(grpc.StatusCode.UNAVAILABLE,
                          admin.CreateRegion(pb.Region(name="ap-northeast", latitude=35.7, longitude=139.7), timeout=15))
    assert "etcd" in detail and time.monotonic() - start < 15

    etcd.start()
    # another client writes right away, before the coordinator's watch has reconnected
    host, port = etcd.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
        for name, lat in (("sa-east", -23.5), ("af-south", -33.9), ("ap-south", 19.1)):
            await client.put(f"/geomesh/v1/regions/{name}".encode(), Region(name, lat, 10.0).to_json())
        await client.delete(b"/geomesh/v1/regions/us-east")

    # the coordinator's watch resumes from its last revision: every event arrives, in order
    seen: dict[str, bool] = {}
    async def follow() -> None:
        while not ({"sa-east", "af-south", "ap-south"} <= {n for n, v in seen.items() if v} and seen.get("us-east") is False):
            update = await feed.read()
            assert not update.snapshot, "the stream should resume with deltas, not a snapshot"
            for r in update.upserts:
                if r.WhichOneof("kind") == "region":
                    seen[r.region.name] = True
            for k in update.removals:
                seen[k.name] = False
    await asyncio.wait_for(follow(), 20)
    names = [r.name for r in (await admin.ListRegions(pb.Empty())).regions]
    assert names == ["af-south", "ap-south", "eu-central", "sa-east"]
    # and writes work again
    await admin.CreateRegion(pb.Region(name="ap-northeast", latitude=35.7, longitude=139.7), timeout=10)
    feed.cancel()


async def test_acknowledged_writes_survive_a_coordinator_restart(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    for i in range(20):
        await admin.AddInstance(pb.Instance(app="web", id=f"i{i}", region="eu-central", address=f"10.90.2.{i + 1}", port=80))
    coordinator.kill()
    coordinator.start()
    fresh = coordinator.admin()
    listed = await fresh.ListInstances(pb.ListInstancesRequest(app="web"))
    assert sorted(i.id for i in listed.instances) == sorted(f"i{i}" for i in range(20))

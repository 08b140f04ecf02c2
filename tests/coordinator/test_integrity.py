"""Referential integrity inside the transaction (probe finding 8) and uniqueness rules (finding 9,
issue 13), against two real coordinator replicas on one real etcd.

The race test runs 1,000 rounds of concurrent creates and deletes that each break a rule if
a check is done outside the transaction (the probe left orphans in 40 of 40 rounds), then scans
etcd and finds no dangling reference (`coordinator.integrity.dangling`)."""

from __future__ import annotations

import asyncio
import time

import aetcd
import grpc
import pytest

from coordinator import integrity
from geomesh.api import geomesh_pb2 as pb

from .test_admin import expect

ROUNDS = 1000
BATCH = 25  # rounds in flight at once


async def scan(etcd) -> list[tuple[bytes, bytes]]:
    host, port = etcd.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        return [(kv.key, kv.value) for kv in await client.get_prefix(b"/geomesh/v1/")]


async def _round(a, b, i: int) -> dict[str, bool]:
    """One round on two replicas `a` and `b`; which racing writes won."""
    r, app, pinner = f"r{i}", f"a{i}", f"p{i}"
    await asyncio.gather(a.CreateRegion(pb.Region(name=r, latitude=1, longitude=1,
                                                  instance_subnet=f"10.{100 + i // 256}.{i % 256}.0/24")),
                         b.CreateApp(pb.App(name=app)))
    calls = {
        # region: deleted while an instance, a pinning app and an instance id land in it
        "delete_region": a.DeleteRegion(pb.DeleteRequest(name=r)),
        "instance": b.AddInstance(pb.Instance(app=app, id=f"i{i}", region=r, address="10.1.0.1", port=80)),
        "pin": a.CreateApp(pb.App(name=pinner, pinned_regions=[r])),
        # app: deleted while a domain lands on it
        "delete_app": b.DeleteApp(pb.DeleteRequest(name=app)),
        "domain": a.AddDomain(pb.Domain(fqdn=f"d{i}.example.com", app=app)),
        # an instance id equal to the app name being created, on the other replica
        "id_is_app": b.AddInstance(pb.Instance(app=app, id=f"n{i}", region=r, address="10.1.0.2", port=80)),
        "app_is_id": a.CreateApp(pb.App(name=f"n{i}")),
        # one instance id, two apps, one region, two replicas
        "id_1": a.AddInstance(pb.Instance(app=app, id=f"x{i}", region=r, address="10.1.0.3", port=80)),
        "id_2": b.AddInstance(pb.Instance(app=pinner, id=f"x{i}", region=r, address="10.1.0.4", port=80)),
        # overlapping subnets (one inside the other), two replicas
        "subnet_1": a.CreateRegion(pb.Region(name=f"s{i}", latitude=1, longitude=1, instance_subnet=f"fd00:0:{i:x}::/64")),
        "subnet_2": b.CreateRegion(pb.Region(name=f"t{i}", latitude=1, longitude=1, instance_subnet=f"fd00:0:{i:x}::/72")),
    }
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    won = {}
    for name, result in zip(calls, results, strict=True):
        if isinstance(result, BaseException):
            assert isinstance(result, grpc.aio.AioRpcError), repr(result)
            assert result.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                     grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), \
                (name, result.code(), result.details())
        won[name] = not isinstance(result, BaseException)
    return won


async def test_concurrent_creates_and_deletes_leave_no_dangling_reference(coordinator_factory, etcd):
    c1, c2 = coordinator_factory(), coordinator_factory()
    a, b = c1.admin(), c2.admin()
    start = time.monotonic()
    wins: dict[str, int] = {}
    for first in range(0, ROUNDS, BATCH):
        for won in await asyncio.gather(*(_round(a, b, i) for i in range(first, first + BATCH))):
            for name, ok in won.items():
                wins[name] = wins.get(name, 0) + ok
    elapsed = time.monotonic() - start
    problems = integrity.dangling(await scan(etcd))
    assert problems == [], problems[:10]
    # each rule was raced both ways: the writes that can both succeed did, sometimes
    assert wins["delete_region"] and wins["instance"] and wins["pin"], wins
    assert wins["delete_app"] and wins["domain"], wins
    # the exclusive pairs: never both
    assert wins["id_1"] + wins["id_2"] <= ROUNDS and wins["subnet_1"] + wins["subnet_2"] == ROUNDS, wins
    assert wins["id_is_app"] + wins["app_is_id"] <= ROUNDS, wins
    print(f"{ROUNDS} rounds in {elapsed:.1f} s; wins {wins}")


async def test_the_scan_finds_what_a_check_outside_the_transaction_leaves(coordinator, etcd):
    """The scanner itself can fail: orphans written behind the coordinator's back are found."""
    admin = coordinator.admin()
    await admin.CreateRegion(pb.Region(name="eu", latitude=1, longitude=1, instance_subnet="10.60.0.0/16"))
    await admin.CreateApp(pb.App(name="web", pinned_regions=["eu"]))
    await admin.AddInstance(pb.Instance(app="web", id="w1", region="eu", address="10.60.0.1", port=80))
    assert integrity.dangling(await scan(etcd)) == []
    host, port = etcd.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
        await client.delete(b"/geomesh/v1/regions/eu")
        await client.put(b"/geomesh/v1/domains/x.example.com", b'{"app":"gone","fqdn":"x.example.com","port":0}')
    rules = sorted(p.rule for p in integrity.dangling(await scan(etcd)))
    assert "region 'eu' does not exist" in rules
    assert "pinned region 'eu' does not exist" in rules
    assert "app 'gone' does not exist" in rules
    assert "index key without its record" in rules


async def test_rules_name_the_field(coordinator):
    admin = coordinator.admin()
    await admin.CreateRegion(pb.Region(name="eu", latitude=1, longitude=1, instance_subnet="10.50.0.0/16"))
    await admin.CreateRegion(pb.Region(name="us", latitude=2, longitude=2))
    await admin.CreateApp(pb.App(name="web"))
    await admin.CreateApp(pb.App(name="shop", pinned_regions=["us"]))
    await admin.AddInstance(pb.Instance(app="web", id="i1", region="eu", address="10.50.0.1", port=80))
    bad_region = [
        (pb.Region(name="r1", latitude=1, longitude=1, instance_subnet="10.50.0.0/16"), "overlaps"),  # finding 9
        (pb.Region(name="r1", latitude=1, longitude=1, instance_subnet="10.50.7.0/24"), "overlaps"),
        (pb.Region(name="r1", latitude=1, longitude=1, instance_subnet="10.0.0.0/8"), "overlaps"),
        (pb.Region(name="r1", latitude=1, longitude=1, instance_subnet="0.0.0.0/0"), "every address"),
        (pb.Region(name="r1", latitude=1, longitude=1, instance_subnet="::/0"), "every address"),
        (pb.Region(name="r1", latitude=1, longitude=1, instance_subnet="10.88.0.0/16"), "mesh"),
    ]
    for msg, words in bad_region:
        assert words in await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.CreateRegion(msg), "instance_subnet")
    bad_instance = [
        (pb.Instance(app="shop", id="i1", region="eu", address="10.50.0.2", port=80), "id", "unique within a region"),
        (pb.Instance(app="web", id="shop", region="eu", address="10.50.0.2", port=80), "id", "app name"),
        (pb.Instance(app="web", id="i2", region="eu", address="fe80::1%eth0", port=80), "address", "zone id"),
        (pb.Instance(app="web", id="i2", region="eu", address="2001:db8::4%" + "b" * 100_000, port=80), "address",
         "longer than 45"),
        (pb.Instance(app="web", id="i2", region="eu", address="127.0.0.1", port=80), "address", "loopback"),
        (pb.Instance(app="web", id="i2", region="eu", address="0.0.0.0", port=80), "address", "unspecified"),
        (pb.Instance(app="web", id="i2", region="eu", address="224.0.0.1", port=80), "address", "multicast"),
        (pb.Instance(app="web", id="i2", region="eu", address="169.254.0.9", port=80), "address", "link-local"),
        (pb.Instance(app="web", id="i" * 64, region="eu", address="10.50.0.2", port=80), "id", "longer than 63"),
    ]
    for msg, field, words in bad_instance:
        assert words in await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.AddInstance(msg), field)
    # the same id in another region is fine; an app named like an instance id is not
    await admin.AddInstance(pb.Instance(app="shop", id="i1", region="us", address="10.51.0.1", port=80))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, admin.CreateApp(pb.App(name="i1")), "name")
    # finding 8: a pinned region cannot be deleted; an app with domains or instances neither
    details = await expect(grpc.StatusCode.FAILED_PRECONDITION, admin.DeleteRegion(pb.DeleteRequest(name="us")))
    assert "app shop" in details and "instance shop/i1" in details
    await admin.RemoveInstance(pb.InstanceRef(app="shop", id="i1"))
    assert "app shop" in await expect(grpc.StatusCode.FAILED_PRECONDITION, admin.DeleteRegion(pb.DeleteRequest(name="us")))
    await admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="shop")))  # unpinned: its ref goes
    await admin.DeleteRegion(pb.DeleteRequest(name="us"))
    # a deleted region's subnet is free again
    await admin.CreateRegion(pb.Region(name="us", latitude=2, longitude=2, instance_subnet="10.51.0.0/16"))


async def test_loopback_instances_need_the_flag(coordinator_factory):
    admin = coordinator_factory("--allow-loopback-instances").admin()
    await admin.CreateRegion(pb.Region(name="eu", latitude=1, longitude=1))
    await admin.CreateApp(pb.App(name="web"))
    await admin.AddInstance(pb.Instance(app="web", id="i1", region="eu", address="127.0.2.11", port=80))
    await expect(grpc.StatusCode.INVALID_ARGUMENT,
                 admin.AddInstance(pb.Instance(app="web", id="i2", region="eu", address="0.0.0.0", port=80)), "address")


@pytest.mark.parametrize("subnet, inside", [
    ("10.50.0.0/16", ["10.50.0.0/16", "10.50.1.0/24", "10.50.255.128/25"]),
    ("fd00::/48", ["fd00::/48", "fd00:0:0:1::/64"]),
])
def test_subnet_claims_are_prefixes_of_the_subnets_inside(subnet, inside):
    claim, larger = integrity.subnet_overlap_keys(subnet)
    for other in inside:
        assert integrity.subnet_claim(other).startswith(claim)
        assert integrity.subnet_claim(subnet) in [*integrity.subnet_overlap_keys(other)[1], claim]
    assert not integrity.subnet_claim("10.51.0.0/16").startswith(claim)
    assert len(larger) == int(subnet.rsplit("/", 1)[1]) - 1

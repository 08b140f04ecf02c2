"""The shared routing table (`geomesh.routing_table`): one record that fails validation is left out
and counted; every other record of the snapshot or delta still applies."""

from __future__ import annotations

from prometheus_client import REGISTRY

from geomesh.api import geomesh_pb2 as pb
from geomesh.routing_table import RoutingTable


def gateway(name: str, ip: str) -> pb.Resource:
    return pb.Resource(gateway=pb.Gateway(name=name, region="eu", public_ip=ip, wg_port=51820,
                                          wg_public_key="A" * 43 + "=", mesh_ip="10.88.0.2", proxy_port=8080,
                                          alive=True))


def skipped() -> float:
    return REGISTRY.get_sample_value("geomesh_routing_resources_skipped_total", {"kind": "gateway"}) or 0.0


def test_a_bad_record_is_skipped_and_the_rest_applies() -> None:
    before = skipped()
    snap = pb.RoutingUpdate(revision=5, snapshot=True, upserts=[
        pb.Resource(region=pb.Region(name="eu", latitude=50.1, longitude=8.7)),
        gateway("gw-a", "192.0.2.1"), gateway("gw-bad", "2001:db8::1%eth0"), gateway("gw-c", "192.0.2.3")])
    table = RoutingTable().apply(snap)
    assert set(table.gateways) == {"gw-a", "gw-c"} and set(table.regions) == {"eu"}
    assert skipped() == before + 1
    delta = pb.RoutingUpdate(revision=6, upserts=[gateway("gw-d", "not an address"), gateway("gw-e", "192.0.2.5")],
                             removals=[pb.ResourceKey(kind=pb.ResourceKey.KIND_GATEWAY, name="gw-a")])
    table = table.apply(delta)
    assert set(table.gateways) == {"gw-c", "gw-e"} and table.revision == 6
    assert skipped() == before + 2

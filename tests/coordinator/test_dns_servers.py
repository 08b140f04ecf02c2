"""GeoDNS servers announcing themselves on the RoutingFeed: the rules as tables (which name and
address a server may announce, who may), the cache's mirror of `dns/<name>` and GetOverview; and
against a real coordinator on real etcd: an announcing stream's key is there with its address and
listed in GetOverview while the stream is open, gone when it closes, and a bad announcement is
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from coordinator.dns_servers import announcement, value_of
from coordinator.rpc_common import Caller
from coordinator.state import State, key
from coordinator.store import Event
from coordinator.views import overview
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import PermissionDeniedError, ValidationError
from geomesh.lab.processes import EtcdProcess

DNS1 = Caller("dns", "dns1")


@pytest.mark.parametrize("name, address, want", [
    ("dns1", "192.0.2.53:53", "192.0.2.53:53"),
    ("dns1", "127.0.0.1:5353", "127.0.0.1:5353"),
    ("dns1", "[2001:DB8::53]:53", "[2001:db8::53]:53"),
    ("dns1", "[::ffff:192.0.2.1]:53", "[::ffff:c000:201]:53"),
])
def test_an_announcement_is_canonical(name: str, address: str, want: str) -> None:
    server = announcement(name, address, DNS1)
    assert server is not None and (server.name, server.address) == (name, want)


def test_a_plain_watcher_announces_nothing() -> None:
    assert announcement("", "", Caller("gateway", "gw1")) is None
    assert announcement("", "", DNS1) is None


@pytest.mark.parametrize("name, address, field", [
    ("dns1", "", "answer_address"),
    ("", "192.0.2.53:53", "server_name"),
    ("DNS1", "192.0.2.53:53", "server_name"),
    ("d" * 64, "192.0.2.53:53", "server_name"),
    ("dns_1", "192.0.2.53:53", "server_name"),
    ("dns1", "192.0.2.53", "answer_address"),          # no port
    ("dns1", "192.0.2.53:0", "answer_address"),        # not a real port
    ("dns1", "192.0.2.53:65536", "answer_address"),
    ("dns1", "192.0.2.53:x", "answer_address"),
    ("dns1", "0.0.0.0:53", "answer_address"),          # a wildcard cannot be queried
    ("dns1", "[::]:53", "answer_address"),
    ("dns1", "224.0.0.1:53", "answer_address"),
    ("dns1", "2001:db8::53:53", "answer_address"),     # IPv6 without brackets
    ("dns1", "[192.0.2.53]:53", "answer_address"),
    ("dns1", "ns1.example.com:53", "answer_address"),  # a name, not an address
    ("dns1", "[fe80::1%eth0]:53", "answer_address"),
    ("dns1", "1" * 200 + ":53", "answer_address"),
])
def test_a_bad_announcement_names_the_field(name: str, address: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        announcement(name, address, DNS1)
    assert info.value.field == field


@pytest.mark.parametrize("caller", [Caller("gateway", "dns1"), Caller("admin", "dns1"), Caller("dns", "dns2")])
def test_only_a_dns_identity_announces_and_only_itself(caller: Caller) -> None:
    with pytest.raises(PermissionDeniedError):
        announcement("dns1", "192.0.2.53:53", caller)


def test_the_cache_mirrors_the_live_dns_servers_and_the_overview_lists_them() -> None:
    s = State()
    s.load(5, [])
    s.apply_batch([Event(key("dns", "dns2"), value_of(announcement("dns2", "192.0.2.54:53", Caller("dns", "dns2"))), 6),
                   Event(key("dns", "dns1"), value_of(announcement("dns1", "[2001:db8::53]:53", DNS1)), 6),
                   Event(key("dns", "bad"), json.dumps({"address": "0.0.0.0:53"}).encode(), 6),
                   Event(key("dns", "junk"), b"{not json", 6)])
    snap = s.snapshot()
    assert dict(snap.dns_servers) == {"dns1": "[2001:db8::53]:53", "dns2": "192.0.2.54:53"}
    assert [(d.name, d.address) for d in overview(snap).dns_servers] == [("dns1", "[2001:db8::53]:53"),
                                                                         ("dns2", "192.0.2.54:53")]
    assert s.changes_since(5).routing == frozenset(), "a DNS server is in no routing feed"
    s.apply_batch([Event(key("dns", "dns2"), None, 7)])
    assert dict(s.snapshot().dns_servers) == {"dns1": "[2001:db8::53]:53"}


# -- against a real coordinator ----------------------------------------------------------------------


async def _dns_key(etcd: EtcdProcess, name: str) -> dict | None:
    from coordinator.store import EtcdStore

    store = EtcdStore(etcd.endpoint)
    await store.connect()
    try:
        kv = await store.get(key("dns", name))
        return None if kv is None else json.loads(kv.value)
    finally:
        await store.close()


async def _eventually(probe, want, timeout: float = 15.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if want(got):
            return got
        assert time.monotonic() < deadline, f"still {got!r} after {timeout} s"
        await asyncio.sleep(0.1)


async def test_an_announcing_stream_holds_its_key_until_it_closes(coordinator, etcd: EtcdProcess) -> None:
    admin = coordinator.admin()
    call = coordinator.routing_feed(name="dns7").Watch(
        pb.WatchRoutingRequest(server_name="dns7", answer_address="127.0.0.7:5353"))
    first = await asyncio.wait_for(call.read(), 10)
    assert first.snapshot
    value = await _eventually(lambda: _dns_key(etcd, "dns7"), lambda v: v is not None)
    assert value["address"] == "127.0.0.7:5353" and value["replica"]

    async def listed() -> list[tuple[str, str]]:
        return [(d.name, d.address) for d in (await admin.GetOverview(pb.Empty())).dns_servers]

    await _eventually(listed, lambda got: got == [("dns7", "127.0.0.7:5353")])
    # a plain watcher (a gateway, another dns server without an announcement) adds nothing
    plain = coordinator.routing_feed(name="dns8").Watch(pb.WatchRoutingRequest())
    assert (await asyncio.wait_for(plain.read(), 10)).snapshot
    assert await listed() == [("dns7", "127.0.0.7:5353")]
    plain.cancel()

    call.cancel()
    await _eventually(lambda: _dns_key(etcd, "dns7"), lambda v: v is None)
    await _eventually(listed, lambda got: got == [])


@pytest.mark.parametrize("name, address, code, field", [
    ("dns9", "127.0.0.9:0", grpc.StatusCode.INVALID_ARGUMENT, "answer_address"),
    ("dns9", "0.0.0.0:53", grpc.StatusCode.INVALID_ARGUMENT, "answer_address"),
    ("dns9", "", grpc.StatusCode.INVALID_ARGUMENT, "answer_address"),
    ("Not_A_Label", "127.0.0.9:53", grpc.StatusCode.INVALID_ARGUMENT, "server_name"),
    ("dns1", "127.0.0.9:53", grpc.StatusCode.PERMISSION_DENIED, "server_name"),  # someone else's name
])
async def test_a_bad_announcement_is_refused_naming_the_field(coordinator, etcd: EtcdProcess, name: str,
                                                               address: str, code: grpc.StatusCode,
                                                               field: str) -> None:
    call = coordinator.routing_feed(name="dns9").Watch(pb.WatchRoutingRequest(server_name=name,
                                                                              answer_address=address))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 10)
    assert info.value.code() == code and field in info.value.details()
    assert await _dns_key(etcd, name) is None


async def test_a_gateway_may_not_announce(coordinator) -> None:
    call = coordinator.routing_feed(role="gateway", name="gw1").Watch(
        pb.WatchRoutingRequest(server_name="gw1", answer_address="127.0.0.1:53"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "server_name" in info.value.details()

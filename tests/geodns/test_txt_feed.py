"""End to end with a real coordinator and etcd: a TXT record written to etcd (as the ACME order
writes a DNS-01 challenge) is served by geomesh-dns through the RoutingFeed -- asked with real
`dig` and `kdig`, over UDP and TCP, in mixed case, through the resolver-shaped fast path -- a
change is served as soon as it arrives and a removal leaves NXDOMAIN; the server announces itself
on its feed (listed in GetOverview while it runs, gone when it stops) and the coordinator's check
(`coordinator.dns_check`) sees the challenge at the announced address. Also the pure rule of what
a server announces and the `--announce-address` flag's errors."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.dns_check import serves_txt, wait_all_serve
from coordinator.state import key
from coordinator.store import EtcdStore, Txn
from geodns.config import Config
from geodns.feed import RoutingFeedClient, announcement
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.model import TxtRecord

from .clients import DigResult, DnsProcess, dig, kdig

ZONE = "geo.example.com"
CHALLENGE = f"_acme-challenge.{ZONE}"


async def put_txt(etcd, name: str, values: tuple[str, ...] | None, ttl: int = 60) -> None:  # noqa: ANN001
    """Write (or, with None, delete) txt/<name> in etcd, as the coordinator's ACME order does."""
    store = EtcdStore(etcd.endpoint)
    await store.connect()
    try:
        if values is None:
            await store.txn(Txn().delete(key("txt", name)))
        else:
            await store.put(key("txt", name), TxtRecord(name, values, ttl=ttl).to_json())
    finally:
        await store.close()


def txt(res: DigResult) -> tuple[str, list[tuple[str, int, str]]]:
    return res.status, sorted((name.lower(), ttl, data) for name, ttl, rtype, data in res.answer if rtype == "TXT")


async def eventually(ask: Callable[[], DigResult], want: Callable[[DigResult], bool], timeout: float = 20.0) -> DigResult:
    deadline = time.monotonic() + timeout
    while True:
        res = await asyncio.to_thread(ask)
        if want(res):
            return res
        assert time.monotonic() < deadline, f"still {txt(res)}: {res.text[-800:]}"
        await asyncio.sleep(0.1)


def start_dns(coordinator, pki, mmdb: Path, tmp_path: Path, name: str, *extra: str) -> DnsProcess:  # noqa: ANN001
    ident = pki.identity("dns", name)
    return DnsProcess(tmp_path, "--coordinator", coordinator.address, "--zone", ZONE, "--ns", "ns1=192.0.2.53",
                      "--negative-ttl", "45", "--tls-ca", str(ident.ca), "--tls-cert", str(ident.cert),
                      "--tls-key", str(ident.key), "--geoip-db", str(mmdb), *extra).start()


async def test_txt_records_ride_the_feed_into_answers(coordinator, etcd, pki, mmdb: Path, tmp_path: Path) -> None:
    await coordinator.admin().CreateRegion(pb.Region(name="eu-central", latitude=50.11, longitude=8.68))
    await put_txt(etcd, CHALLENGE, ("token-one", "token-two"), ttl=7)
    dns = start_dns(coordinator, pki, mmdb, tmp_path, "dns-txt")
    try:
        want = ("NOERROR", [(CHALLENGE + ".", 7, '"token-one"'), (CHALLENGE + ".", 7, '"token-two"')])
        res = await eventually(lambda: dig(dns.port, CHALLENGE, "TXT"), lambda r: txt(r) == want)
        assert "aa" in res.flags
        assert txt(kdig(dns.port, CHALLENGE, "TXT", tcp=True)) == want
        assert txt(dig(dns.port, CHALLENGE, "TXT", tcp=True)) == want
        mixed = dig(dns.port, "_AcMe-CHALLENGE.gEo.Example.COM", "TXT")
        assert txt(mixed) == want and mixed.question == "_AcMe-CHALLENGE.gEo.Example.COM."
        assert {name for name, *_ in mixed.answer} == {"_AcMe-CHALLENGE.gEo.Example.COM."}
        # other types at the name: NODATA with the SOA; a name below it: NXDOMAIN
        nodata = dig(dns.port, CHALLENGE, "A")
        assert (nodata.status, nodata.answer) == ("NOERROR", []) and [rr[2] for rr in nodata.authority] == ["SOA"]
        assert dig(dns.port, f"x.{CHALLENGE}", "TXT").status == "NXDOMAIN"

        # the resolver's shape (one Client Subnet option, no cookie) once the region map is built:
        # the second ask comes from the template straight from the bytes, the third from the reply cache
        dns.wait_map()
        for _ in range(3):
            assert txt(dig(dns.port, CHALLENGE, "TXT", "+nocookie", subnet="193.0.6.0/24")) == want

        # a new value is served as soon as it arrives, by every path and cache
        await put_txt(etcd, CHALLENGE, ("token-three",), ttl=9)
        want = ("NOERROR", [(CHALLENGE + ".", 9, '"token-three"')])
        await eventually(lambda: dig(dns.port, CHALLENGE, "TXT", "+nocookie", subnet="193.0.6.0/24"),
                         lambda r: txt(r) == want)
        assert txt(dig(dns.port, CHALLENGE, "TXT")) == want
        assert txt(kdig(dns.port, CHALLENGE, "TXT", tcp=True)) == want
        assert txt(dig(dns.port, CHALLENGE.upper(), "TXT")) == ("NOERROR", [(CHALLENGE + ".", 9, '"token-three"')])

        # removed: the name is gone (NXDOMAIN with the SOA), over UDP and TCP
        await put_txt(etcd, CHALLENGE, None)
        gone = await eventually(lambda: dig(dns.port, CHALLENGE, "TXT", "+nocookie", subnet="193.0.6.0/24"),
                                lambda r: r.status == "NXDOMAIN")
        assert [rr[2] for rr in gone.authority] == ["SOA"]
        assert dig(dns.port, CHALLENGE, "TXT").status == "NXDOMAIN"
        assert kdig(dns.port, CHALLENGE, "TXT", tcp=True).status == "NXDOMAIN"
    finally:
        dns.stop()


async def test_the_server_announces_itself_and_the_check_sees_the_challenge(coordinator, etcd, pki, mmdb: Path,
                                                                            tmp_path: Path) -> None:
    admin = coordinator.admin()
    dns = start_dns(coordinator, pki, mmdb, tmp_path, "dns-check", "--no-region-map")
    try:
        address = f"127.0.0.1:{dns.port}"

        async def listed() -> list[tuple[str, str]]:
            return [(d.name, d.address) for d in (await admin.GetOverview(pb.Empty())).dns_servers]

        deadline = time.monotonic() + 20
        while await listed() != [("dns-check", address)]:  # its identity's name, its first --listen address
            assert time.monotonic() < deadline, (await listed(), dns.log()[-2000:])
            await asyncio.sleep(0.1)

        servers = {"dns-check": address}
        await put_txt(etcd, CHALLENGE, ("abc",), ttl=5)
        assert await wait_all_serve(servers, CHALLENGE, ["abc"], deadline=20) == []
        assert await serves_txt(address, CHALLENGE.upper(), ("abc",), timeout=2)
        # another value set, a name it does not serve: not served (within a short deadline)
        assert not await serves_txt(address, CHALLENGE, ("abc", "def"), timeout=2)
        assert await wait_all_serve(servers, f"_acme-challenge.www.{ZONE}", ["abc"], deadline=0.5) == ["dns-check"]
        # a server that does not answer (a UDP port nobody listens on) is named, never an exception
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:
            quiet.bind(("127.0.0.1", 0))  # bound and never read: queries go unanswered
            silent = f"127.0.0.1:{quiet.getsockname()[1]}"
            started = time.monotonic()
            missing = await wait_all_serve({**servers, "silent": silent}, CHALLENGE, ["abc"], deadline=1.0)
            assert missing == ["silent"] and time.monotonic() - started < 10
        assert not await serves_txt("not-an-address", CHALLENGE, ("abc",), timeout=1)

        # the value changes: the check waits until the server serves the new set
        await put_txt(etcd, CHALLENGE, ("new-1", "new-2"))
        assert await wait_all_serve(servers, CHALLENGE, ("new-2", "new-1"), deadline=20) == []
    finally:
        dns.stop()
    deadline = time.monotonic() + 20
    while await listed():  # the stream closed with the server: it is no longer a live DNS server
        assert time.monotonic() < deadline, await listed()
        await asyncio.sleep(0.1)


async def test_a_refused_announcement_is_dropped_and_the_feed_followed(coordinator, pki) -> None:
    """A coordinator that refuses the announcement (here: a name that is not the identity's) gets
    the stream again without it: the server still follows the feed."""
    tables = []
    ident = pki.identity("dns", "dns-refused")
    client = RoutingFeedClient([coordinator.address], ident, tables.append, backoff_initial=0.05,
                               announce=("someone-else", "127.0.0.1:53"))
    task = asyncio.create_task(client.run())
    try:
        deadline = time.monotonic() + 15
        while not tables:
            assert time.monotonic() < deadline, client.status.last_error
            await asyncio.sleep(0.05)
        assert client.announce is None and "PERMISSION_DENIED" in client.status.last_error
        assert "server_name" in client.status.last_error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("listen, port, flag, want", [
    (("127.0.0.1", 0), 5353, "", ("dns1", "127.0.0.1:5353")),  # the first --listen, with its bound port
    (("::1", 53), 53, "", ("dns1", "[::1]:53")),
    (("0.0.0.0", 53), 53, "", None),  # a wildcard: nobody can query it, so nothing is announced
    (("::", 53), 53, "", None),
    (("0.0.0.0", 53), 53, "192.0.2.53:53", ("dns1", "192.0.2.53:53")),
])
def test_what_a_server_announces(listen: tuple[str, int], port: int, flag: str, want) -> None:  # noqa: ANN001
    assert announcement("dns1", listen, port, flag) == want


@pytest.mark.parametrize("args, message", [
    (["--announce-address", "0.0.0.0:53"], "--announce-address: 0.0.0.0 cannot be queried"),
    (["--announce-address", "192.0.2.53:0"], "--announce-address: port '0' is not 1-65535"),
    (["--announce-address", "192.0.2.53"], "--announce-address: '192.0.2.53' is not ip:port"),
])
def test_a_bad_announce_address_names_the_flag(mmdb: Path, args: list[str], message: str) -> None:
    base = ["--coordinator", "127.0.0.1:1", "--zone", ZONE, "--insecure", "--geoip-db", str(mmdb)]
    with pytest.raises(ValidationError) as info:
        Config.from_args([*base, *args])
    assert str(info.value).startswith(message)
    assert Config.from_args([*base, "--announce-address", "[2001:DB8::53]:53"]).announce_address == "[2001:db8::53]:53"


def test_announce_address_is_for_the_feed(tmp_path: Path, mmdb: Path) -> None:
    state = tmp_path / "state.toml"
    state.write_text(f'[zone]\nname = "{ZONE}"\n')
    with pytest.raises(ValidationError) as info:
        Config.from_args(["--state", str(state), "--geoip-db", str(mmdb), "--announce-address", "192.0.2.53:53"])
    assert info.value.field == "--announce-address"

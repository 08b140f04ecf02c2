"""End to end with a real coordinator and etcd: geomesh-dns follows the RoutingFeed over mTLS, drops
a gateway whose control stream dies, takes it back when it returns, fails over to the next region,
and keeps answering the pre-outage gateways while the coordinator is away.

Timing: a watcher of its own follows the same RoutingFeed and stamps when each gateway delta
arrives; the DNS answer must change under a second after that delta (geodns' part). How long the
coordinator takes from a stream cut to the delta is asserted too (under a second)."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from pathlib import Path

from dnslib import QTYPE, RCODE, DNSRecord

from geomesh.api import geomesh_pb2 as pb

from .clients import DnsProcess, dig, query, udp_exchange

ZONE = "geo.example.com"
EUROPE = "193.0.6.0/24"  # Amsterdam in GeoLite2: nearest region eu-central
GATEWAYS = {"gw-eu-1": ("eu-central", "192.0.2.21"), "gw-eu-2": ("eu-central", "192.0.2.22"),
            "gw-us-1": ("us-east", "192.0.2.31")}


def wg_key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


def answer_set(port: int) -> tuple[str, frozenset[str]]:
    raw = udp_exchange(port, query(f"shop.{ZONE}", ecs=EUROPE), timeout=1.0)
    if raw is None:
        return "TIMEOUT", frozenset()
    reply = DNSRecord.parse(raw)
    return RCODE[reply.header.rcode], frozenset(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)


async def wait_answer(port: int, want: set[str], timeout: float = 15.0) -> float:
    """Poll until the answer is exactly `want`; returns the seconds it took."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        last = await asyncio.to_thread(answer_set, port)
        if last == ("NOERROR", frozenset(want)):
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"answer still {last}, wanted {sorted(want)}")


class FeedWatcher:
    """Follows RoutingFeed.Watch with its own identity; remembers when each gateway change arrived."""

    def __init__(self, coordinator) -> None:
        self.events: list[tuple[float, str, bool, int]] = []  # (monotonic, gateway, alive, state)
        self.call = coordinator.routing_feed(name="watcher").Watch(pb.WatchRoutingRequest())
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for update in self.call:
            now = time.monotonic()
            for r in update.upserts:
                if r.WhichOneof("kind") == "gateway":
                    self.events.append((now, r.gateway.name, r.gateway.alive, r.gateway.state))

    async def delta(self, after: float, gateway: str, alive: bool, state: int | None = None,
                    timeout: float = 15.0) -> float:
        """When the first change of `gateway` to (alive, state) after `after` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, name, is_alive, st in self.events:
                if when >= after and name == gateway and is_alive == alive and (state is None or st == state):
                    return when
            await asyncio.sleep(0.002)
        raise AssertionError(f"no delta {gateway} alive={alive} state={state}")

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def change_and_measure(port: int, watcher: FeedWatcher, what: str, action, gateway: str, alive: bool,
                             want: set[str], state: int | None = None) -> None:
    """Do `action`; the delta for `gateway` arrives, and the answer becomes `want` under a second
    after that delta."""
    cut = time.monotonic()
    await action()
    answered = cut + await wait_answer(port, want)
    delta = await watcher.delta(cut, gateway, alive, state)
    print(f"{what}: delta {1000 * (delta - cut):.0f} ms after the change, answer {1000 * (answered - delta):.0f} ms "
          f"after the delta")
    assert answered - delta < 1.0, f"{what}: answer changed {answered - delta:.3f}s after the delta"
    if not alive and state is None:  # a cut stream: the coordinator's delta itself is due in under a second
        assert delta - cut < 1.0, f"{what}: the coordinator took {delta - cut:.3f}s to report the cut"


async def open_session(stub, name: str):
    call = stub.Session()
    await call.write(pb.SessionUp(hello=pb.SessionHello(name=name)))
    first = await asyncio.wait_for(call.read(), 10)
    assert first.routing.snapshot
    return call


async def seed_gateways(coordinator) -> tuple[dict, dict]:
    """Two regions, the app "shop" with an instance in each, GATEWAYS enrolled and registered, and
    a session open for each: (their GatewayControl stubs, their sessions)."""
    admin = coordinator.admin()
    await admin.CreateRegion(pb.Region(name="eu-central", latitude=50.11, longitude=8.68))
    await admin.CreateRegion(pb.Region(name="us-east", latitude=39.04, longitude=-77.49))
    await admin.CreateApp(pb.App(name="shop"))
    await admin.AddInstance(pb.Instance(app="shop", id="eu1", region="eu-central", address="10.90.2.7", port=80))
    await admin.AddInstance(pb.Instance(app="shop", id="us1", region="us-east", address="10.90.3.7", port=80))
    controls = {name: coordinator.gateway_control(name) for name in GATEWAYS}
    for i, (name, (region, ip)) in enumerate(GATEWAYS.items()):
        await coordinator.enroll(name, region, ip)
        await controls[name].Register(pb.RegisterRequest(name=name, region=region, public_ip=ip, wg_port=51820,
                                                         wg_public_key=wg_key(i + 1), proxy_port=8080))
    sessions = {name: await open_session(controls[name], name) for name in GATEWAYS}
    return controls, sessions


async def test_failover_follows_gateway_streams(coordinator, pki, mmdb: Path, tmp_path: Path) -> None:
    controls, sessions = await seed_gateways(coordinator)
    admin = coordinator.admin()
    watcher = FeedWatcher(coordinator)

    dns_id = pki.identity("dns", "dns1")
    dns = DnsProcess(tmp_path, "--coordinator", coordinator.address, "--zone", ZONE, "--ns", "ns1=192.0.2.53",
                     "--default-region", "eu-central", "--tls-ca", str(dns_id.ca), "--tls-cert", str(dns_id.cert),
                     "--tls-key", str(dns_id.key), "--geoip-db", str(mmdb)).start()
    try:
        await wait_answer(dns.port, {"192.0.2.21", "192.0.2.22"})
        res = dig(dns.port, f"shop.{ZONE}", subnet=EUROPE)
        assert res.addresses() == {"192.0.2.21", "192.0.2.22"} and "aa" in res.flags
        assert dig(dns.port, f"shop.{ZONE}", subnet="8.8.8.0/24", tcp=True).addresses() == {"192.0.2.31"}
        assert dig(dns.port, f"gw.us-east.{ZONE}").addresses() == {"192.0.2.31"}

        async def cut(name: str) -> None:
            sessions[name].cancel()

        async def reopen(name: str) -> None:
            sessions[name] = await open_session(controls[name], name)

        # a gateway's stream dies: it leaves the answer
        await change_and_measure(dns.port, watcher, "stream cut", lambda: cut("gw-eu-1"), "gw-eu-1", False,
                                 {"192.0.2.22"})
        assert dig(dns.port, f"shop.{ZONE}", subnet=EUROPE, tcp=True).addresses() == {"192.0.2.22"}
        # it comes back
        await change_and_measure(dns.port, watcher, "stream back", lambda: reopen("gw-eu-1"), "gw-eu-1", True,
                                 {"192.0.2.21", "192.0.2.22"})
        # the whole region goes: Europe fails over to the next nearest region hosting the app
        await change_and_measure(dns.port, watcher, "second cut", lambda: cut("gw-eu-1"), "gw-eu-1", False,
                                 {"192.0.2.22"})
        await change_and_measure(dns.port, watcher, "region lost", lambda: cut("gw-eu-2"), "gw-eu-2", False,
                                 {"192.0.2.31"})
        await change_and_measure(dns.port, watcher, "region back", lambda: reopen("gw-eu-2"), "gw-eu-2", True,
                                 {"192.0.2.22"})
        # draining a gateway takes it out too
        await change_and_measure(dns.port, watcher, "drain", lambda: admin.DrainGateway(pb.GetRequest(name="gw-eu-2")),
                                 "gw-eu-2", True, {"192.0.2.31"}, pb.GATEWAY_STATE_DRAINING)
        await change_and_measure(dns.port, watcher, "activate",
                                 lambda: admin.ActivateGateway(pb.GetRequest(name="gw-eu-2")),
                                 "gw-eu-2", True, {"192.0.2.22"}, pb.GATEWAY_STATE_ACTIVE)
        watcher.close()

        # the coordinator goes away (a planned stop, then its gateways' streams die with it): the
        # pre-outage gateway set keeps being answered, never an empty answer
        before = await asyncio.to_thread(answer_set, dns.port)
        assert before == ("NOERROR", frozenset({"192.0.2.22"}))
        coordinator.stop()
        for call in sessions.values():
            call.cancel()
        for _ in range(15):
            assert await asyncio.to_thread(answer_set, dns.port) == before
            await asyncio.sleep(0.1)
        assert dig(dns.port, f"gw.us-east.{ZONE}").addresses() == {"192.0.2.31"}

        # it comes back on the same port: the feed resumes and follows changes again
        coordinator.start()
        admin = coordinator.admin()
        await admin.CreateRegion(pb.Region(name="ap-southeast", latitude=1.29, longitude=103.85))
        deadline = time.monotonic() + 20
        while dig(dns.port, f"gw.ap-southeast.{ZONE}").status != "NOERROR":
            assert time.monotonic() < deadline, dns.log()[-3000:]
            await asyncio.sleep(0.1)
        assert dns.log().count("routing feed connected") >= 2
    finally:
        watcher.close()
        for call in sessions.values():
            call.cancel()
        dns.stop()


async def test_dns_waits_for_the_first_snapshot(coordinator, pki, mmdb: Path, tmp_path: Path) -> None:
    """Before the first snapshot: apex answers, app names SERVFAIL (not a false NXDOMAIN)."""
    dns_id = pki.identity("dns", "dns2")
    # a coordinator address that refuses connections: no snapshot ever arrives
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    dns = DnsProcess(tmp_path, "--coordinator", dead, "--zone", ZONE, "--tls-ca", str(dns_id.ca),
                     "--tls-cert", str(dns_id.cert), "--tls-key", str(dns_id.key), "--geoip-db", str(mmdb)).start()
    try:
        assert dig(dns.port, ZONE, "SOA").status == "NOERROR"
        assert dig(dns.port, f"shop.{ZONE}").status == "SERVFAIL"
        assert dig(dns.port, "www.example.org").status == "REFUSED"
    finally:
        dns.stop()


async def test_insecure_loopback_coordinator(coordinator_factory, mmdb: Path, tmp_path: Path) -> None:
    """The loopback demo mode: plaintext feed, identity sent as metadata (--insecure --name)."""
    import grpc

    from geomesh.api import geomesh_pb2_grpc as pbg
    from geomesh.channel import insecure_metadata

    coordinator = coordinator_factory("--insecure")
    async with grpc.aio.insecure_channel(coordinator.address) as ch:
        admin = pbg.AdminStub(ch)
        meta = insecure_metadata(None, "admin", "root")
        await admin.CreateRegion(pb.Region(name="eu-central", latitude=50.11, longitude=8.68), metadata=meta)
        await admin.CreateApp(pb.App(name="shop"), metadata=meta)
    dns = DnsProcess(tmp_path, "--coordinator", coordinator.address, "--insecure", "--name", "dns-demo",
                     "--zone", ZONE, "--geoip-db", str(mmdb)).start()
    try:
        deadline = time.monotonic() + 15
        while dig(dns.port, f"shop.{ZONE}").status != "NOERROR":  # NODATA: no gateway yet, but known
            assert time.monotonic() < deadline, dns.log()[-2000:]
            await asyncio.sleep(0.1)
        assert dig(dns.port, f"gw.eu-central.{ZONE}").status == "NOERROR"
        assert dig(dns.port, f"nosuch.{ZONE}").status == "NXDOMAIN"
    finally:
        dns.stop()

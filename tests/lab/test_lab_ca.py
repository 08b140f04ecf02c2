"""The lab's ACME CA and the coordinator's resolver when the lab runs in namespaces, with real
pebble, gdnsd and unbound: pebble runs inside the customer's DNS namespace (where its HTTP-01
validation reaches the gateways' documentation addresses) and its ACME and management listeners
answer on the host's 127.0.0.1 through relays; the coordinator's own unbound on the host's
127.0.0.1 answers the customer's published TXT record over TCP through a relay into the
namespace; and the host's own namespace never gets a route to the documentation ranges."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from geomesh.lab import netns
from geomesh.lab.customer_dns import ask
from geomesh.lab.customer_zone import CustomerDns, records_for
from geomesh.lab.pebble import PebbleProcess

ZONE, LAB_ZONE, DOMAIN = "shop.example.net", "lab.geomesh.test", "www.shop.example.net"
DOC_PREFIXES = ("192.0.2.", "198.51.100.", "203.0.113.")


def host_routes() -> list[str]:
    """The host namespace's IPv4 routes (every table) that touch a documentation range."""
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, timeout=10)
    return [line for line in out.stdout.splitlines() if any(p in line for p in DOC_PREFIXES)]


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[netns.Topology]:
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    topo = netns.Topology(state_dir=tmp_path / "netns")
    with topo:
        yield topo
    left = netns.leftovers(topo.prefix)
    assert left == {"namespaces": [], "sockets": [], "links": []}, f"teardown left {left}"


def test_pebble_in_the_dns_namespace_answers_on_the_hosts_loopback_and_the_coordinators_resolver_sees_the_txt(
        topology: netns.Topology, tmp_path: Path) -> None:
    routes_before = host_routes()
    host = topology.add_host("dns", network="203.0.113.0/24")
    customer = CustomerDns.start(tmp_path / "customer", ZONE, LAB_ZONE, geodns_port=9, host=host)
    pebble = PebbleProcess(tmp_path / "pebble", dns_server=customer.resolver, http_port=8080, netns=host)
    try:
        # the coordinator's resolver is on the host's loopback; the gateways' is on the namespace's public address
        assert customer.coordinator_resolver.startswith("127.0.0.1:") and customer.resolver == "203.0.113.10:53"
        assert set(customer.pids) == {"gdnsd", "unbound", "unbound-host"}

        pebble.start()  # its readiness is checked from here, through the relay
        assert pebble.directory.startswith("https://127.0.0.1:")
        assert pebble.proc is not None and pebble.proc.pid in host.pids()  # it runs inside the namespace
        config = json.loads((pebble.dir / "pebble-config.json").read_text())["pebble"]
        assert (config["httpPort"], config["listenAddress"]) == (8080, f"127.0.0.1:{pebble.port}")
        cmd = Path(f"/proc/{pebble.proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert cmd[cmd.index("-dnsserver") + 1] == "203.0.113.10:53"  # it validates through the lab's unbound
        assert "BEGIN CERTIFICATE" in pebble.root_pem()  # the management listener, relayed too

        # the owner publishes the record: the coordinator's resolver, asked from the host, answers it
        name = f"_geomesh-app-address.{DOMAIN}"
        customer.publish(records_for(DOMAIN, "hello", LAB_ZONE))
        address = customer.host_unbound.address if customer.host_unbound else ("", 0)
        deadline = time.monotonic() + 20  # unbound may keep its first negative answer for 1 s
        while not (reply := ask(address, name)) or not reply.rr:
            assert time.monotonic() < deadline, f"the coordinator's resolver never answered the TXT: {reply}"
            time.sleep(0.2)
        assert [str(rr.rdata) for rr in reply.rr] == ['"app=hello"']
        assert customer.host_unbound is not None and customer.host_unbound.queries(name) >= 1
        # and so does the gateways' (asked inside the namespace)
        assert [str(rr.rdata) for rr in customer.unbound.ask(name).rr] == ['"app=hello"']
        assert host_routes() == routes_before, "the host namespace got a route to a documentation range"
    finally:
        pebble.stop()
        customer.stop()

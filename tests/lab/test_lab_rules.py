"""The lab's pure parts, table-tested: reading kdig's answer, the fault commands, the plan with
two gateways in a region, the reachability matrix of the live view, its handshake ages (from GetOverview, so shared
`geomesh/` imports no service package, and no service imports the lab), and the gateway config's
[reach] table (accepted by the agent's own config loader), the curl commands the TLS steps print,
the customer's records, the one plain port pebble validates HTTP-01 at, and the customer's DNS
(real gdnsd + unbound) with the gateway config that names its resolver and on-demand wait."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
from rich.console import Console

from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.lab import dns_answer, faults
from geomesh.lab.customer_zone import CustomerDns, records_for, zone_text
from geomesh.lab.display import handshakes, reachability_table
from geomesh.lab.plan import make_plan
from geomesh.lab.runner import REACH, Lab, RunningGateway
from geomesh.lab.zone_certificate import curl_argv
from geomesh.model import Region
from geomesh.regions_file import GatewaySpec, RegionFile

HEADER = ";; ->>HEADER<<- opcode: QUERY; status: {status}; id: 4242\n;; Flags: qr aa rd; QUERY: 1; ANSWER: {n}\n"
QUESTION = ";; QUESTION SECTION:\n;; hello.lab.geomesh.test.\t\tIN\tA\n\n"


def kdig_output(status: str, *ips: str) -> str:
    answer = "".join(f"hello.lab.geomesh.test.\t30\tIN\tA\t{ip}\n" for ip in ips)
    return HEADER.format(status=status, n=len(ips)) + QUESTION + (";; ANSWER SECTION:\n" + answer if ips else "") \
        + "\n;; Received 67 B\n"


@pytest.mark.parametrize(("output", "status", "addresses", "nodata", "answered"), [
    (kdig_output("NOERROR", "192.0.2.21"), "NOERROR", ("192.0.2.21",), False, True),
    (kdig_output("NOERROR", "192.0.2.21", "192.0.2.22"), "NOERROR", ("192.0.2.21", "192.0.2.22"), False, True),
    (kdig_output("NOERROR"), "NOERROR", (), True, False),                       # NODATA: what fail-open forbids
    (kdig_output("NXDOMAIN"), "NXDOMAIN", (), False, False),
    (kdig_output("SERVFAIL"), "SERVFAIL", (), False, False),
    (";; WARNING: response timeout for 127.0.0.1@53(UDP)\n", "TIMEOUT", (), False, False),
    ("", "TIMEOUT", (), False, False),
    # a CNAME or an AAAA line is not an address of the A answer
    (kdig_output("NOERROR") + "x.test.\t30\tIN\tAAAA\t2001:db8::1\n", "NOERROR", (), True, False),
])
def test_kdig_answers(output, status, addresses, nodata, answered):
    ans = dns_answer.parse(output)
    assert (ans.status, ans.addresses, ans.nodata, ans.answered) == (status, addresses, nodata, answered)


def test_kdig_argv_carries_the_client_subnet():
    argv = dns_answer.kdig_argv(5353, "hello.lab.geomesh.test", "2.0.1.0/24", short=True)
    assert argv[:6] == ["kdig", "@127.0.0.1", "-p", "5353", "hello.lab.geomesh.test", "A"]
    assert "+short" in argv and "+subnet=2.0.1.0/24" in argv
    assert "+subnet" not in " ".join(dns_answer.kdig_argv(53, "x", None))


@pytest.mark.parametrize(("up", "want"), [
    (False, [["ip", "netns", "exec", "gmab12-gw", "ip", "link", "set", "eth0", "down"]]),
    (True, [["ip", "netns", "exec", "gmab12-gw", "ip", "link", "set", "eth0", "up"],
            ["ip", "netns", "exec", "gmab12-gw", "ip", "route", "replace", "default", "via", "192.0.2.1", "dev", "eth0"]]),
])
def test_link_commands(up, want):
    assert faults.link_commands("gmab12-gw", "eth0", up=up, router="192.0.2.1") == want


def test_blackhole_commands_sorted_add_and_delete():
    add = faults.blackhole_commands("ns", ["192.0.2.21", "192.0.2.11"], add=True)
    assert add == [["ip", "netns", "exec", "ns", "ip", "route", "replace", "blackhole", "192.0.2.11/32"],
                   ["ip", "netns", "exec", "ns", "ip", "route", "replace", "blackhole", "192.0.2.21/32"]]
    assert faults.blackhole_commands("ns", ["192.0.2.11"], add=False)[0][6] == "del"
    assert faults.signal_command(42, "STOP") == ["kill", "-STOP", "42"]


def test_time_until_measures_and_gives_up():
    calls = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3
    took = faults.time_until(third_time, 5, every=0.01)
    assert took is not None and 0.015 <= took < 2 and len(calls) == 3
    assert faults.time_until(lambda: False, 0.05, every=0.01) is None


def _region(name: str, lat: float, subnet: str, *gws: tuple[str, str]) -> RegionFile:
    return RegionFile(Region(name=name, latitude=lat, longitude=0.0, instance_subnet=subnet),
                      tuple(GatewaySpec(n, name, ip) for n, ip in gws))


def test_plan_with_two_gateways_in_a_region_puts_the_instances_beside_the_first():
    regions = [_region("ap-northeast", 35, "10.90.3.0/24", ("gw-ap-1", "192.0.2.31")),
               _region("eu-central", 50, "10.90.2.0/24", ("gw-eu-1", "192.0.2.21"), ("gw-eu-2", "192.0.2.22")),
               _region("us-east", 39, "10.90.1.0/24", ("gw-us-1", "192.0.2.11"))]
    plan = make_plan(regions, netns=True)
    assert [g.name for g in plan.gateways] == ["gw-ap-1", "gw-eu-1", "gw-eu-2", "gw-us-1"]
    assert [g.short for g in plan.gateways] == ["g0", "g1", "g2", "g3"]
    assert plan.regions == ("ap-northeast", "eu-central", "us-east")
    assert plan.gateway_of("eu-central").name == "gw-eu-1"
    assert [g.name for g in plan.gateways_of("eu-central")] == ["gw-eu-1", "gw-eu-2"]
    assert plan.instance_host("gw-eu-1") and not plan.instance_host("gw-eu-2") and plan.instance_host("gw-us-1")
    assert {i.address for i in plan.instances if i.region == "eu-central"} == {"10.90.2.11", "10.90.2.12"}
    loop = make_plan(regions, netns=False)
    assert [g.public_ip for g in loop.gateways] == ["127.0.1.11", "127.0.1.12", "127.0.1.13", "127.0.1.14"]
    assert plan.http01_port == loop.http01_port == 8080  # where the lab's pebble validates HTTP-01


def test_plan_refuses_gateways_whose_plain_ports_differ():
    """The lab's pebble validates HTTP-01 at one port: a region file giving one gateway another
    plain port is refused, naming the field and the gateway."""
    regions = [_region("ap-northeast", 35, "10.90.3.0/24", ("gw-ap-1", "192.0.2.31")),
               RegionFile(Region(name="eu-central", latitude=50, longitude=0.0, instance_subnet="10.90.2.0/24"),
                          (GatewaySpec("gw-eu-1", "eu-central", "192.0.2.21", proxy_port=8081),)),
               _region("us-east", 39, "10.90.1.0/24", ("gw-us-1", "192.0.2.11"))]
    with pytest.raises(ValidationError) as err:
        make_plan(regions, netns=True)
    assert err.value.field == "gateways.proxy_port"
    assert "gw-eu-1 has 8081, gw-ap-1 8080" in err.value.message


def test_reachability_matrix_shows_session_verdict_regions_rtt_cut_off_and_panic_held():
    ov = pb.Overview(cut_off_regions=["ap-northeast"], panic_held=["gw-us-1"], gateways=[
        pb.GatewayHealth(name="gw-eu-1", region="eu-central", session=pb.SESSION_STATE_OPEN, reachable=False,
                         seen_by=[], down_by=["ap-northeast", "us-east"], probe_rtt_ms=0, in_dns=False),
        pb.GatewayHealth(name="gw-us-1", region="us-east", session=pb.SESSION_STATE_TIMED_OUT, reachable=True,
                         seen_by=["eu-central"], down_by=[], probe_rtt_ms=1.25, in_dns=True)])
    console = Console(width=200, record=True)
    console.print(reachability_table(ov))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    eu, us = rows["gw-eu-1"], rows["gw-us-1"]
    assert "open" in eu and "unreachable" in eu and "ap-northeast, us-east" in eu and " no " in eu
    assert "timed out" in us and "reachable" in us and "eu-central" in us and "1.2 ms" in us and "yes" in us
    assert "cut-off prober regions: ap-northeast" in text and "held by the panic threshold: gw-us-1" in text


def test_the_labs_reach_table_is_what_the_agent_accepts(tmp_path: Path):
    from regional_gateway.agent_config import load

    path = tmp_path / "gw.toml"
    reach = "".join(f"{k} = {v}\n" for k, v in REACH.items())
    path.write_text(f'name = "gw-1"\nregion = "eu"\ncoordinators = ["127.0.0.1:1"]\npublic_ip = "192.0.2.1"\n'
                    f'insecure = true\n[reach]\n{reach}')
    c = load(path)
    assert (c.reach_interval, c.reach_timeout, c.reach_fall, c.reach_rise, c.reach_prober_regions) == (0.5, 0.5, 3, 2, 3)


def test_handshake_ages_come_from_the_overview():
    ov = pb.Overview(gateways=[
        pb.GatewayHealth(name="gw-a", peers=[pb.PeerHandshake(name="gw-b", age_seconds=12.5),
                                             pb.PeerHandshake(name="gw-c", age_seconds=0)]),
        pb.GatewayHealth(name="gw-b")])
    assert handshakes(ov) == {("gw-a", "gw-b"): 12.5, ("gw-a", "gw-c"): None}


def test_shared_code_imports_no_service_package():
    root = Path(__file__).resolve().parents[2] / "geomesh"
    services = {"coordinator", "regional_gateway", "geodns", "status_page"}
    bad = []
    for path in root.rglob("*.py"):
        if "api" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in services]
    assert not bad


def _imported(node: ast.AST) -> list[str]:
    """The modules an import statement names (`from a import b` names a and a.b: b may be a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return []


def test_no_service_package_imports_the_lab():
    """The lab is a wing that starts the services as processes: no service reaches into it (nor
    into its namespace and process helpers, which live there)."""
    root = Path(__file__).resolve().parents[2]
    bad = []
    for service in ("coordinator", "regional_gateway", "geodns", "status_page"):
        for path in (root / service).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                bad += [f"{path.relative_to(root)}: {n}" for n in _imported(node)
                        if n == "geomesh.lab" or n.startswith("geomesh.lab.")]
    assert not bad


@pytest.mark.parametrize(("port", "https", "url"), [
    (443, True, "https://hello.lab.geomesh.test/"),
    (8443, True, "https://hello.lab.geomesh.test:8443/"),
    (8080, False, "http://hello.lab.geomesh.test:8080/"),
])
def test_curl_argv_resolves_at_the_gateway_and_trusts_only_the_root(port, https, url):
    argv = curl_argv("hello.lab.geomesh.test", "192.0.2.21", port, "root.pem", https=https)
    assert argv[-1] == url and argv[argv.index("--max-time") + 1] == "5"
    # a custom domain's first request may wait while its certificate is obtained on demand
    assert curl_argv("www.shop.example.net", "192.0.2.21", port, "root.pem", max_time=15)[3] == "15"
    assert argv[argv.index("--resolve") + 1] == f"hello.lab.geomesh.test:{port}:192.0.2.21"
    assert ("--cacert" in argv) is https and ("-k" not in argv and "--insecure" not in argv)
    if https:
        assert argv[argv.index("--cacert") + 1] == "root.pem"


def test_the_customers_records_are_the_documented_pair():
    assert records_for("www.shop.example.net", "hello", "lab.geomesh.test") == (
        '_geomesh-app-address.www.shop.example.net. 30 TXT "app=hello"',
        "www.shop.example.net. 30 CNAME hello.lab.geomesh.test.")
    text = zone_text(("x 30 A 192.0.2.1",), serial=7)
    assert "@ SOA ns1 hostmaster 7 7200 1800 259200 5\n" in text  # negative answers cached 5 s at most
    assert text.endswith("x 30 A 192.0.2.1\n")


def test_customer_dns_publishes_and_the_labs_gateway_config_names_its_resolver(tmp_path: Path):
    """Real gdnsd + unbound on loopback: a published TXT is what the resolver answers; the gateway
    config the lab writes (TLS listener, [custom_domains] resolver) is what the agent accepts."""
    from regional_gateway.agent_config import load

    regions = [_region("ap-northeast", 35, "10.90.3.0/24", ("gw-ap-1", "192.0.2.31")),
               _region("eu-central", 50, "10.90.2.0/24", ("gw-eu-1", "192.0.2.21")),
               _region("us-east", 39, "10.90.1.0/24", ("gw-us-1", "192.0.2.11"))]
    plan = make_plan(regions, netns=False)
    customer = CustomerDns.start(tmp_path / "dns", plan.customer_zone, plan.zone, geodns_port=9)
    try:
        assert customer.unbound.ask(f"_geomesh-app-address.{plan.custom_domain}").rr == []
        customer.publish(records_for(plan.custom_domain, "hello", plan.zone))
        deadline = time.monotonic() + 20  # unbound keeps the earlier negative answer up to 1 s
        while not (reply := customer.unbound.ask(f"_geomesh-app-address.{plan.custom_domain}")) or not reply.rr:
            assert time.monotonic() < deadline, f"never answered the published TXT: {reply}"
            time.sleep(0.2)
        assert [str(rr.rdata) for rr in reply.rr] == ['"app=hello"']
        assert set(customer.pids) == {"gdnsd", "unbound"}
        (tmp_path / "lab").mkdir()
        in_netns = make_plan(regions, netns=True)  # its gateways reach the coordinator by unix socket
        lab = Lab(tmp_path / "lab", regions, in_netns, say=lambda _line: None)
        lab.cp.pki.init()
        lab.customer = customer
        rg = RunningGateway(in_netns.gateways[1], tmp_path / "gw.toml")
        config = load(lab._gateway_config(rg))
        assert (config.https_port, config.proxy_port, config.public_ip) == (443, 8080, "192.0.2.21")
        assert config.custom_domains == {"resolver": customer.resolver, "on_demand_wait": 10.0}
        assert customer.coordinator_resolver == customer.resolver  # on loopback the coordinator shares it
    finally:
        customer.stop()

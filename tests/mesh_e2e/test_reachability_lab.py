"""Reachability end to end, for real: the lab's topology in network namespaces with wireguard-go.

One lab for the whole module (`geomesh.lab.runner.Lab`, built from a copy of
`deploy/regions/*.toml` with a second gateway in eu-central, so one region has two gateways):
embedded etcd, a coordinator, geodns, and four gateway agents in their own namespaces probing
each other's public addresses. Faults are the lab's own commands (`geomesh.lab.faults`): a
public link cut while the coordinator session stays up, a silent gateway (SIGSTOP), a region
whose probers cannot reach any other region, every public link cut, and two gateways of one
region disagreeing about an instance's health (the region's instances live beside its first
gateway only). Time bounds are generous (a loaded CI machine); `bench/failover.py` measures the
real figures. After each fault the lab is restored and must be healthy again; at the end nothing
the module made is left (namespaces, interfaces, processes).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from coordinator.heartbeats import health_owner
from coordinator.state import key
from coordinator.store import EtcdStore
from geomesh.api import geomesh_pb2 as pb
from geomesh.lab import dns_answer, netns
from geomesh.lab.faults import time_until
from geomesh.lab.plan import make_plan
from geomesh.lab.runner import Lab, netns_unavailable_reason
from geomesh.lab.vantage import find
from geomesh.regions_file import load_dir

ROOT = Path(__file__).resolve().parents[2]
EU, SECOND_EU, ISOLATED = "gw-eu-central-1", "gw-eu-central-2", "ap-northeast"

pytestmark = pytest.mark.netns


class ReachLab:
    """The running lab plus what the tests ask it: DNS per client continent, the overview."""

    def __init__(self, lab: Lab, subnets: dict[str, str]) -> None:
        self.lab = lab
        self.subnets = subnets  # region -> an ECS subnet GeoDNS sends to that region
        self.ip_of = {g.name: g.public_ip for g in lab.plan.gateways}
        self.healthy_answers = {r: self.ask(r).addresses for r in subnets}

    def ask(self, region: str) -> dns_answer.DnsAnswer:
        return dns_answer.query(self.lab.dns_port, f"hello.{self.lab.plan.zone}", self.subnets[region], timeout=1)

    def overview(self) -> pb.Overview:
        return asyncio.run(self.lab.overview())

    def restore(self, timeout: float = 90) -> None:
        for g in self.lab.plan.gateways:
            self.lab.set_public_link(g.name, up=True)
        self.lab.isolate_region(ISOLATED, on=False)
        self.lab.wait_healthy(timeout)


def _region_files(dest: Path) -> Path:
    dest.mkdir()
    for f in sorted((ROOT / "deploy" / "regions").glob("*.toml")):
        shutil.copy(f, dest / f.name)
    with open(dest / "eu-central.toml", "a") as f:
        f.write(f'\n[[gateways]]\nname = "{SECOND_EU}"\npublic_ip = "192.0.2.22"\nwg_port = 51820\nproxy_port = 8080\n')
    return dest


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def rl(tmp_path_factory):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"the netns lab needs root and wireguard-go: {reason}")
    base = tmp_path_factory.mktemp("reach-lab")
    regions = load_dir(_region_files(base / "regions"))
    state = base / "state"
    state.mkdir()
    lab = Lab(state, regions, make_plan(regions, netns=True), say=lambda _: None)
    try:
        lab.up()
        lab.wait_healthy(90)
        vantages = find(("NA", "EU", "AS"))
        by_ip = {g.public_ip: g.region for g in lab.plan.gateways}
        subnets: dict[str, str] = {}
        for v in vantages.values():
            ans = dns_answer.query(lab.dns_port, f"hello.{lab.plan.zone}", v.subnet)
            regions_answered = {by_ip.get(ip) for ip in ans.addresses}
            assert len(regions_answered) == 1 and None not in regions_answered, (v, ans)
            subnets[regions_answered.pop()] = v.subnet
        assert set(subnets) == set(lab.plan.regions), subnets
        yield ReachLab(lab, subnets)
    finally:
        prefix = lab.topology.prefix if lab.topology is not None else None
        lab.down()
    left = netns.leftovers(prefix) if prefix else {}
    assert not any(left.values()), f"left behind: {left}"
    assert not _processes_mentioning(str(state)), "the lab left processes behind"


def _connects(lab: Lab, gateway: str, address: str, port: int) -> bool:
    host = lab.gateways[gateway].host
    assert host is not None

    def attempt() -> bool:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return True
        except OSError:
            return False
    return host.call(attempt)


async def _instance_records(etcd: str, names: list[str]) -> dict[str, tuple[bool, int]]:
    """name -> (healthy, mod revision) of each instance's etcd record."""
    import json

    store = EtcdStore(etcd, timeout=5)
    await store.connect()
    try:
        out = {}
        for name in names:
            kv = await store.get(key("instances", name))
            assert kv is not None, name
            out[name] = (bool(json.loads(kv.value)["healthy"]), kv.mod_revision)
        return out
    finally:
        await store.close()


def test_two_gateways_disagreeing_about_an_instance_do_not_flap_its_health(rl):
    lab = rl.lab
    insts = [i for i in lab.plan.instances if i.region == "eu-central"]
    # the premise: the first EU gateway reaches the region's instances, the second cannot
    assert all(_connects(lab, EU, i.address, i.port) for i in insts)
    assert not any(_connects(lab, SECOND_EU, i.address, i.port) for i in insts)
    names = [f"{i.app}/{i.id}" for i in insts]
    owners = {n: health_owner(n, [EU, SECOND_EU]) for n in names}
    want = {n: owners[n] == EU for n in names}  # each record takes its owner's word only
    etcd = lab.cp.etcd.endpoint

    def settled() -> bool:
        return {n: h for n, (h, _) in asyncio.run(_instance_records(etcd, names)).items()} == want
    assert time_until(settled, 40, every=0.5) is not None, \
        f"instance health never took its owners' word: {asyncio.run(_instance_records(etcd, names))}, want {want}"
    before = asyncio.run(_instance_records(etcd, names))
    time.sleep(5)  # both gateways keep reporting their (different) views every heartbeat
    after = asyncio.run(_instance_records(etcd, names))
    assert after == before, f"instance health flapped: {before} -> {after}"


def test_public_link_cut_leaves_dns_and_comes_back(rl):
    victim = rl.ip_of[EU]
    assert victim in rl.ask("eu-central").addresses
    rl.lab.set_public_link(EU, up=False)
    try:
        gone = time_until(lambda: (a := rl.ask("eu-central")).answered and victim not in a.addresses, 20)
        assert gone is not None, f"{EU} still answered 20 s after its public link was cut"
        h = {g.name: g for g in rl.overview().gateways}[EU]
        assert h.session == pb.SESSION_STATE_OPEN, "the session should stay up: only the public link is cut"
        assert not h.reachable and not h.in_dns, h
    finally:
        rl.lab.set_public_link(EU, up=True)
    assert time_until(lambda: victim in rl.ask("eu-central").addresses, 30) is not None, \
        f"{EU} not back in DNS 30 s after its link was restored"
    rl.restore()


def test_silent_gateway_leaves_dns_and_comes_back(rl):
    victim = rl.ip_of[EU]
    rl.lab.signal_gateway(EU, "STOP")
    try:
        gone = time_until(lambda: (a := rl.ask("eu-central")).answered and victim not in a.addresses, 20)
        assert gone is not None, f"{EU} still answered 20 s after SIGSTOP"
    finally:
        rl.lab.signal_gateway(EU, "CONT")
    assert time_until(lambda: victim in rl.ask("eu-central").addresses, 30) is not None, \
        f"{EU} not back in DNS 30 s after SIGCONT"
    rl.restore()


def test_a_region_cut_off_from_every_other_excludes_no_gateway_of_another_region(rl):
    others = [g for g in rl.lab.plan.gateways if g.region != ISOLATED]
    excluded: list[str] = []
    wrong_answers: list[str] = []

    def look() -> pb.Overview:
        ov = rl.overview()
        excluded.extend(f"{g.name} (reachable={g.reachable}, in_dns={g.in_dns})" for g in ov.gateways
                        if g.name in {o.name for o in others} and not (g.reachable and g.in_dns))
        for region in {o.region for o in others}:
            ans = rl.ask(region)
            if set(ans.addresses) != set(rl.healthy_answers[region]):
                wrong_answers.append(f"{region}: {ans.status} {ans.addresses}")
        return ov

    rl.lab.isolate_region(ISOLATED, on=True)
    try:
        named = time_until(lambda: ISOLATED in look().cut_off_regions, 20, every=0.2)
        assert named is not None, f"GetOverview never named {ISOLATED} cut off: {rl.overview()}"
        end = time.monotonic() + 5  # keep looking while the cut lasts
        while time.monotonic() < end:
            look()
            time.sleep(0.2)
    finally:
        rl.lab.isolate_region(ISOLATED, on=False)
    assert not excluded, f"gateways of other regions excluded while {ISOLATED} was cut off: {excluded[:5]}"
    assert not wrong_answers, f"DNS moved clients of other regions: {wrong_answers[:5]}"
    rl.restore()


def test_every_public_link_cut_dns_still_answers(rl):
    answers: list[tuple[str, dns_answer.DnsAnswer]] = []
    for g in rl.lab.plan.gateways:
        rl.lab.set_public_link(g.name, up=False)
    try:
        end = time.monotonic() + 8  # past the probes' fall time: every prober fails on every target
        while time.monotonic() < end:
            answers += [(r, rl.ask(r)) for r in rl.subnets]
            time.sleep(0.1)
        ov = rl.overview()
    finally:
        for g in rl.lab.plan.gateways:
            rl.lab.set_public_link(g.name, up=True)
    bad = [(r, a) for r, a in answers if not a.answered]
    assert answers and not bad, f"{len(bad)} of {len(answers)} answers were not records (fail-open broken): {bad[:5]}"
    assert any(g.in_dns for g in ov.gateways), f"GetOverview shows no gateway in DNS: {ov}"
    rl.restore()

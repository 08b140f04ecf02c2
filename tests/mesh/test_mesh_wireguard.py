"""A real WireGuard full mesh: wireguard-go in host namespaces joined by an "internet" namespace.

No coordinator: each host gets its desired peer set from a static full-mesh list, applied by
`MeshApplier` over the userspace backend. Checks: every host pings every other over the mesh IPs;
a 4th host joins without restarting anyone and without touching existing peers (their
handshakes and byte counters survive, the plans for them are empty); an agent restart adopts
the running wireguard-go and changes nothing; a removed host disappears from every peer list;
routes for allowed IPs outside the mesh subnet come and go; teardown leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from geomesh.lab import netns
from regional_gateway.wireguard.applier import MeshApplier
from regional_gateway.wireguard.backend import WireGuardError
from regional_gateway.wireguard.keys import PrivateKey, load_or_create
from regional_gateway.wireguard.peers import Peer, Plan
from regional_gateway.wireguard.userspace import UserspaceBackend
from tests.mesh.conftest import needs_wireguard_go

pytestmark = [pytest.mark.netns, needs_wireguard_go]

WG_PORT = 51820
MESH_PREFIX = 24  # mesh IPs 10.77.0.<n>/24, inside the namespaces only


@dataclass
class MeshHost:
    host: netns.Host
    key: PrivateKey
    ifname: str
    mesh_ip: str
    backend: UserspaceBackend
    applier: MeshApplier
    extra: tuple[str, ...] = ()
    keepalive: int = 0

    @property
    def peer(self) -> Peer:
        return Peer(self.key.public_key, f"{self.host.public_ip}:{WG_PORT}",
                    (f"{self.mesh_ip}/32", *self.extra), persistent_keepalive=self.keepalive, name=self.host.short)


def start_host(topology: netns.Topology, tmp_path: Path, wireguard_go: str, n: int,
               extra: tuple[str, ...] = (), keepalive: int = 0, settle_delay: float = 1.0) -> MeshHost:
    host = topology.add_host(f"gw{n}")
    key = load_or_create(tmp_path / f"gw{n}" / "wg.key")
    ifname = topology.ifname()
    backend = UserspaceBackend(binary=wireguard_go, netns=host.name, log_path=tmp_path / f"gw{n}-wg.log")
    backend.ensure_interface(ifname, key, WG_PORT, f"10.77.0.{n}/{MESH_PREFIX}")
    return MeshHost(host, key, ifname, f"10.77.0.{n}", backend, MeshApplier(backend, settle_delay=settle_delay),
                    extra, keepalive)


def full_mesh(hosts: list[MeshHost]) -> dict[str, Peer]:
    """The static desired set: every host (MeshApplier drops the device's own key)."""
    return {h.key.public_key: h.peer for h in hosts}


async def wait_ping(src: MeshHost, dst_ip: str, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not await asyncio.to_thread(src.host.ping, dst_ip):
        if time.monotonic() > deadline:
            raise AssertionError(f"{src.host.short} cannot reach {dst_ip} over the mesh")


async def all_reach_all(hosts: list[MeshHost]) -> None:
    """Every host pings every other. One direction of each pair first: two first packets crossing
    make both sides initiate at once, which wireguard-go may only settle on its 5 s retry."""
    await asyncio.gather(*(wait_ping(a, b.mesh_ip) for a, b in itertools.combinations(hosts, 2)))
    await asyncio.gather(*(wait_ping(b, a.mesh_ip) for a, b in itertools.combinations(hosts, 2)))


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_full_mesh_join_restart_remove(topology: netns.Topology, tmp_path: Path, wireguard_go: str) -> None:
    hosts = [await asyncio.to_thread(start_host, topology, tmp_path, wireguard_go, n) for n in (1, 2, 3)]
    pids = {h.ifname: h.backend.pid for h in hosts}
    assert all(pids.values())
    try:
        # --- 3 hosts, full mesh from a static list
        for h in hosts:
            plan = await h.applier.apply_peers(full_mesh(hosts))
            assert len(plan.adds) == 2 and not plan.updates and not plan.removes
            assert set(h.backend.peers()) == {o.key.public_key for o in hosts if o is not h}
        await all_reach_all(hosts)

        observed = {h.ifname: await h.applier.observe() for h in hosts}
        for h in hosts:
            assert all(p.last_handshake is not None and p.rx_bytes > 0 for p in observed[h.ifname].values())
            assert metric("geomesh_mesh_peers_configured", interface=h.ifname) == 2
            for o in hosts:
                if o is not h:
                    age = metric("geomesh_mesh_peer_handshake_age_seconds", interface=h.ifname, peer=o.host.short)
                    assert age is not None and 0 <= age < math.inf

        # --- a 4th host joins, with an instance subnet outside the mesh range (needs a route)
        h4 = await asyncio.to_thread(start_host, topology, tmp_path, wireguard_go, 4, extra=("10.201.4.0/24",))
        h4.host.run(["ip", "addr", "add", "10.201.4.1/32", "dev", "lo"])
        hosts.append(h4)
        for h in hosts:
            plan = await h.applier.apply_peers(full_mesh(hosts))
            if h is h4:
                assert len(plan.adds) == 3
            else:
                assert plan == Plan(adds=(h4.peer,)), "existing peers must not be touched"
        await all_reach_all(hosts)
        for h in hosts[:3]:
            assert "10.201.4.0/24" in h.host.run(["ip", "route", "show", "proto", "77"]).stdout
            await wait_ping(h, "10.201.4.1")  # routed into the tunnel to gw4 via its allowed IPs

        # nobody restarted, and the links among the first three were not re-set:
        # same handshake, counters kept growing instead of starting over
        assert {h.ifname: h.backend.pid for h in hosts[:3]} == pids
        for h in hosts[:3]:
            now = h.backend.peers()
            for key, before in observed[h.ifname].items():
                assert now[key].last_handshake == before.last_handshake
                assert now[key].rx_bytes > before.rx_bytes and now[key].tx_bytes > before.tx_bytes

        # --- an agent restart: a new backend adopts the running wireguard-go, the plan is empty
        old = hosts[0]
        await old.applier.close()  # the interface stays up
        adopted = UserspaceBackend(binary=wireguard_go, netns=old.host.name)
        await asyncio.to_thread(adopted.ensure_interface, old.ifname, load_or_create(tmp_path / "gw1" / "wg.key"),
                                WG_PORT, f"{old.mesh_ip}/{MESH_PREFIX}")
        assert adopted.adopted and adopted.pid is None
        before = adopted.peers()
        restarted = MeshApplier(adopted)
        assert (await restarted.apply_peers(full_mesh(hosts))).empty
        assert {k: p.last_handshake for k, p in adopted.peers().items()} == {k: p.last_handshake for k, p in before.items()}
        old.backend, old.applier = adopted, restarted
        await all_reach_all(hosts)

        # --- gw2 leaves: its peer disappears everywhere
        gone = hosts.pop(1)
        for h in hosts:
            plan = await h.applier.apply_peers(full_mesh(hosts))
            assert plan == Plan(removes=(gone.key.public_key,))
            assert gone.key.public_key not in h.backend.peers()
        assert not await asyncio.to_thread(hosts[0].host.ping, gone.mesh_ip)
        await gone.applier.close(remove_interface=True)
        assert not (Path("/var/run/wireguard") / f"{gone.ifname}.sock").exists()
        assert netns.proc_start_time(pids[gone.ifname]) is None
        await all_reach_all(hosts)

        # --- gw4 leaves: its instance route goes with it
        h4 = hosts.pop()
        for h in hosts:
            assert (await h.applier.apply_peers(full_mesh(hosts))).removes == (h4.key.public_key,)
            assert "10.201.4.0/24" not in h.host.run(["ip", "route", "show", "proto", "77"]).stdout
    finally:
        for h in hosts:
            await h.applier.close(remove_interface=True)
    started = [p for p in pids.values() if p]
    topology.teardown()
    assert all(netns.proc_start_time(pid) is None for pid in started)
    assert netns.leftovers(topology.prefix) == {"namespaces": [], "sockets": [], "links": []}


async def test_keepalives_are_held_back_then_set_and_handshakes_come_without_traffic(
        topology: netns.Topology, tmp_path: Path, wireguard_go: str) -> None:
    hosts = [await asyncio.to_thread(start_host, topology, tmp_path, wireguard_go, n, keepalive=25, settle_delay=0.2)
             for n in (1, 2, 3)]
    try:
        plans = await asyncio.gather(*(h.applier.apply_peers(full_mesh(hosts)) for h in hosts))
        # both ends of each link add the peer without a keepalive first (held back)
        for p in plans:
            assert len(p.adds) == 2 and all(a.persistent_keepalive == 0 for a in p.adds)
        # follow-up applies set every keepalive; the keepalives alone (no ping) bring up every link
        deadline = time.monotonic() + 30
        while True:
            state = [h.backend.peers() for h in hosts]
            if all(p.persistent_keepalive == 25 and p.last_handshake for peers in state for p in peers.values()):
                break
            assert time.monotonic() < deadline, f"keepalives/handshakes not all there: {state}"
            await asyncio.sleep(0.1)
        for h in hosts:  # settled: nothing left to do
            assert (await h.applier.apply_peers(full_mesh(hosts))).empty
        await all_reach_all(hosts)
    finally:
        for h in hosts:
            await h.applier.close(remove_interface=True)


def test_interface_name_taken_in_another_namespace_is_a_clear_error(
        topology: netns.Topology, tmp_path: Path, wireguard_go: str) -> None:
    a = start_host(topology, tmp_path, wireguard_go, 1)
    b = topology.add_host("other")
    intruder = UserspaceBackend(binary=wireguard_go, netns=b.name)
    with pytest.raises(WireGuardError, match="unique on the host"):
        intruder.ensure_interface(a.ifname, PrivateKey.generate(), WG_PORT, "10.77.0.9/24")
    intruder.close()
    a.backend.close(remove_interface=True)


def test_key_and_port_are_applied_and_a_restart_keeps_them(
        topology: netns.Topology, tmp_path: Path, wireguard_go: str) -> None:
    a = start_host(topology, tmp_path, wireguard_go, 1)
    dev = a.backend.device()
    assert dev.listen_port == WG_PORT and dev.private_key_hex == a.key.secret_hex()
    assert f"10.77.0.1/{MESH_PREFIX}" in a.host.run(["ip", "-o", "addr", "show", a.ifname]).stdout
    assert "UP" in a.host.run(["ip", "link", "show", a.ifname]).stdout
    # same key file, same identity; a different port is applied to the adopted device
    again = UserspaceBackend(binary=wireguard_go, netns=a.host.name)
    again.ensure_interface(a.ifname, load_or_create(tmp_path / "gw1" / "wg.key"), WG_PORT + 1, "10.77.0.1/24")
    assert again.public_key == a.key.public_key and again.device().listen_port == WG_PORT + 1
    again.close(remove_interface=True)  # an adopted wireguard-go: the tun is deleted, the process exits
    assert netns.proc_start_time(a.backend.pid) is None  # type: ignore[arg-type]
    assert not (Path("/var/run/wireguard") / f"{a.ifname}.sock").exists()


async def test_applier_refuses_blocking_calls_on_the_loop_and_counts_errors() -> None:
    backend = UserspaceBackend(binary="wireguard-go")  # never ensured: no interface to talk to
    applier = MeshApplier(backend)
    before = metric("geomesh_mesh_apply_errors_total", interface="?") or 0
    with pytest.raises(WireGuardError, match="ensure_interface"):
        await applier.apply_peers({})
    assert metric("geomesh_mesh_apply_errors_total", interface="?") == before + 1
    with pytest.raises(WireGuardError, match="worker thread"):
        backend.ensure_interface("gmnever0", PrivateKey.generate(), WG_PORT, "10.77.0.1/24")

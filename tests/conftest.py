"""Fixtures shared by the whole suite: a real etcd, a PKI, coordinator processes.

`etcd`          a real etcd-server on free loopback ports with a temporary data dir (per test)
`pki`           a geomesh CA in a temporary directory (per session)
`coordinator_factory(**flags)`  starts a coordinator subprocess on that etcd; all stopped after
`coordinator`   one coordinator from the factory (`enroll(name, region, *ips)` enrolls a gateway)
`topology`      a started `geomesh.lab.netns.Topology` (fresh random prefix, state record in the
                default state dir, so a crashed run is swept by the next session); skipped with
                the reason where namespaces cannot be made; after the test it is torn down and
                the test fails if a namespace, UAPI socket or host link of it is left
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.lab import netns
from geomesh.lab.processes import EtcdProcess, ServiceProcess
from geomesh.pki import Identity, Pki


@pytest.fixture
def topology() -> Iterator[netns.Topology]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    topo = netns.Topology()
    with topo:
        yield topo
    left = netns.leftovers(topo.prefix)
    assert left == {"namespaces": [], "sockets": [], "links": []}, f"teardown left {left}"
    assert not topo.state_file.exists()


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed: run scripts/install.sh (./run test does)")


@pytest.fixture
def etcd(tmp_path: Path):
    _need("etcd")
    proc = EtcdProcess(tmp_path / "etcd")
    proc.start()
    yield proc
    proc.cleanup()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.init()
    p.server()  # the coordinator's serving certificate, made offline as `geomesh pki init` does
    return p


class CoordinatorProcess(ServiceProcess):
    """A `geomesh-coordinator` subprocess (real process, real mTLS port) on the test's etcd."""

    def __init__(self, etcd: EtcdProcess, pki: Pki, workdir: Path, extra: list[str]) -> None:
        super().__init__("coordinator.main", ["--etcd", etcd.endpoint, "--pki-dir", str(pki.dir),
                                              "--lease-ttl", "2", *extra], workdir)
        self.etcd = etcd
        self.pki = pki
        self._channels: list[grpc.aio.Channel] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> int:
        # a restart keeps the port, so clients can reconnect to the same address
        listen = f"127.0.0.1:{self.port}" if self.port else "127.0.0.1:0"
        self.args = [a for i, a in enumerate(self.args)
                     if a != "--listen" and (i == 0 or self.args[i - 1] != "--listen")] + ["--listen", listen]
        return super().start(timeout)

    def channel(self, identity: Identity) -> grpc.aio.Channel:
        ch = client_channel(self.address, identity)
        self._channels.append(ch)
        return ch

    def admin(self, name: str = "root") -> pbg.AdminStub:
        return pbg.AdminStub(self.channel(self.pki.identity("admin", name)))

    def gateway_control(self, name: str) -> pbg.GatewayControlStub:
        return pbg.GatewayControlStub(self.channel(self.pki.identity("gateway", name)))

    def routing_feed(self, role: str = "dns", name: str = "dns1") -> pbg.RoutingFeedStub:
        return pbg.RoutingFeedStub(self.channel(self.pki.identity(role, name)))

    async def enroll(self, name: str, region: str, *public_ips: str) -> pb.EnrollGatewayResponse:
        """Enroll gateway `name` in `region` with its public addresses (an admin call): a
        gateway registers only as enrolled."""
        return await self.admin().EnrollGateway(pb.Enrollment(name=name, region=region, public_ips=list(public_ips)))


@pytest.fixture
def coordinator_factory(etcd: EtcdProcess, pki: Pki, tmp_path: Path):
    made: list[CoordinatorProcess] = []

    def make(*extra: str) -> CoordinatorProcess:
        workdir = tmp_path / f"coordinator{len(made)}"
        workdir.mkdir()
        c = CoordinatorProcess(etcd, pki, workdir, list(extra))
        c.start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def coordinator(coordinator_factory) -> CoordinatorProcess:
    return coordinator_factory()

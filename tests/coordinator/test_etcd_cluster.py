"""A 3-member TLS etcd cluster from the shipped deploy files, and a coordinator riding its faults.

The cluster is started from `deploy/etcd/etcd-cluster.env.example` itself (addresses moved to
127.0.0.1, throwaway certificates); the coordinator from the flags of
`deploy/systemd/geomesh-coordinator.service` (every member, TLS, client certificate). Then, with
real processes: the leader is SIGKILLed under a stream of Admin writes (no acknowledged write is
lost, writes resume); the member the coordinator uses is SIGKILLed (it fails over, and simulated
gateways' alive keys are never deleted meanwhile); and a history of 2,000 reads and writes under
leader kills (the history `bench/faults.py` records) is checked for linearizability
(`geomesh.register_history`).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.faults import history
from coordinator.state import PREFIX, key
from coordinator.store import Compacted, EtcdConfig, EtcdStore
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import StoreUnavailableError
from geomesh.lab.processes import DEPLOY_EXAMPLE, ROOT, EtcdCluster, free_port, read_env_file
from geomesh.pki import Pki
from geomesh.register_history import check

from ..conftest import CoordinatorProcess
from .test_reach import mesh

UNIT = ROOT / "deploy" / "systemd" / "geomesh-coordinator.service"
WRITE_RATE = 50.0
RESUME_BOUND = 10.0  # generous: an election takes ~1 s; this machine is shared


@pytest.fixture
def cluster(tmp_path: Path):
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run scripts/install.sh (./run test does)")
    c = EtcdCluster(tmp_path / "etcd")
    c.start()
    yield c
    c.stop()


def unit_args(cluster: EtcdCluster, pki: Pki, metrics_port: int) -> list[str]:
    """The shipped unit's ExecStart flags for this cluster: the example's member addresses become
    the cluster's ports, /etc files the test's (--server-host is left out: the test PKI's serving
    certificate names 127.0.0.1); anything else left pointing at a host fails."""
    text = UNIT.read_text().replace("\\\n", " ")
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    args = shlex.split(exec_start.removeprefix("ExecStart="))[1:]
    example = read_env_file(DEPLOY_EXAMPLE.read_text())
    hosts = re.findall(r"=https://([^:]+):\d+", example["ETCD_INITIAL_CLUSTER"])
    files = {"--etcd-ca": cluster.tls.ca, "--etcd-cert": cluster.tls.client_cert, "--etcd-key": cluster.tls.client_key,
             "--pki-dir": pki.dir}
    out: list[str] = []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag == "--server-host":
            continue
        if flag == "--etcd":
            for i, h in enumerate(hosts):
                value = value.replace(f"{h}:2379", f"127.0.0.1:{cluster.members[i].client_port}")
        elif flag in files:
            value = str(files[flag])
        elif flag in ("--listen", "--metrics-host"):
            value = {"--listen": "127.0.0.1:0", "--metrics-host": "127.0.0.1"}[flag]
        elif flag == "--metrics-port":
            value = str(metrics_port)
        assert "/etc/" not in value and "10.0.0." not in value, (flag, value)
        out += [flag, value]
    return out


class ClusterCoordinator(CoordinatorProcess):
    """A coordinator started with the systemd unit's flags against the test cluster."""

    def __init__(self, cluster: EtcdCluster, pki: Pki, workdir: Path) -> None:
        super().__init__(cluster.members[0], pki, workdir, [])  # type: ignore[arg-type]
        self.metrics_port = free_port()
        self.args = [*unit_args(cluster, pki, self.metrics_port), "--lease-ttl", "2"]

    def current_etcd(self) -> str:
        """The member the coordinator uses now, from its metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        found = re.findall(r'geomesh_etcd_endpoint_current\{endpoint="([^"]+)"\} 1\.0', text)
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def cluster_coordinator(cluster: EtcdCluster, pki: Pki, tmp_path: Path):
    c = ClusterCoordinator(cluster, pki, tmp_path / "coordinator")
    c.start()
    yield c
    c.stop()


def store_for(cluster: EtcdCluster, first: int = 0, timeout: float = 2.0) -> EtcdStore:
    """Our etcd client on the cluster (TLS, client certificate), starting at member `first`."""
    eps = cluster.endpoints[first:] + cluster.endpoints[:first]
    return EtcdStore(EtcdConfig.parse(eps, ca=cluster.tls.ca, cert=cluster.tls.client_cert,
                                      key=cluster.tls.client_key), timeout=timeout)


class AppWriter:
    """Admin/CreateApp at a fixed rate, one call in flight, each name retried until acknowledged;
    ALREADY_EXISTS after a failed try counts as acknowledged (the failed try had applied)."""

    def __init__(self, admin, prefix: str) -> None:  # noqa: ANN001
        self.admin, self.prefix = admin, prefix
        self.acked: dict[str, float] = {}
        self.failures = 0

    async def run(self, seconds: float, rate: float = WRITE_RATE) -> None:
        n, tried, start = 0, False, time.monotonic()
        while time.monotonic() - start < seconds:
            name = f"{self.prefix}{n:05d}"
            try:
                await self.admin.CreateApp(pb.App(name=name), timeout=2)
            except grpc.aio.AioRpcError as exc:
                if not (tried and exc.code() == grpc.StatusCode.ALREADY_EXISTS):
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                    self.failures += 1
                    tried = True
                    await asyncio.sleep(1 / rate)
                    continue
            self.acked[name] = time.monotonic()
            n, tried = n + 1, False
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))

    def longest_gap(self, since: float) -> float:
        times = sorted(t for t in self.acked.values() if t >= since)
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))


async def stored_apps(cluster: EtcdCluster) -> set[str]:
    store = store_for(cluster, first=next(i for i, m in enumerate(cluster.members) if m.alive()))
    try:
        _, kvs = await store.get_prefix(key("apps", ""))
        return {kv.key.decode().rsplit("/", 1)[1] for kv in kvs}
    finally:
        await store.close()


# -- the deploy files work together ------------------------------------------------------------

async def test_the_deploy_files_run_a_tls_cluster_and_a_coordinator_on_all_members(cluster, cluster_coordinator):
    assert all(e.startswith("https://127.0.0.1:") for e in cluster.endpoints)
    assert "--etcd-ca" in cluster_coordinator.args and len(cluster_coordinator.args[1].split(",")) == 3
    admin = cluster_coordinator.admin()
    await admin.CreateRegion(pb.Region(name="eu", latitude=50.1, longitude=8.7), timeout=10)
    assert (await admin.GetRegion(pb.GetRequest(name="eu"), timeout=5)).name == "eu"
    assert cluster_coordinator.current_etcd() in cluster.endpoints

    # etcd refuses a client without a certificate, and plaintext
    for config in (EtcdConfig.parse(cluster.endpoints, ca=cluster.tls.ca),
                   EtcdConfig.parse([e.removeprefix("https://") for e in cluster.endpoints])):
        store = EtcdStore(config, timeout=2)
        with pytest.raises(StoreUnavailableError):
            await store.get(key("regions", "eu"))
        await store.close()


# -- leader kill ---------------------------------------------------------------------------------

async def test_leader_kill_loses_no_acknowledged_write_and_writes_resume(cluster, cluster_coordinator):
    writer = AppWriter(cluster_coordinator.admin(), "w")
    load = asyncio.create_task(writer.run(5.0))
    await asyncio.sleep(1.5)
    leader = cluster.leader()
    killed_at = time.monotonic()
    cluster.members[leader].kill()
    await load

    after = [t for t in writer.acked.values() if t > killed_at]
    assert after, "no write was acknowledged after the leader died"
    assert min(after) - killed_at < RESUME_BOUND
    assert len(writer.acked) > 50
    lost = set(writer.acked) - await stored_apps(cluster)
    assert not lost, f"{len(lost)} acknowledged writes lost: {sorted(lost)[:5]}"


# -- the coordinator's own member dies -----------------------------------------------------------

async def test_the_coordinators_own_member_dies_it_fails_over_and_no_gateway_leaves(cluster, cluster_coordinator):
    async with mesh(cluster_coordinator, {"gw-a": "eu", "gw-b": "us"}):
        probe = store_for(cluster)
        deadline = time.monotonic() + 10
        while len((await probe.get_prefix(key("alive", "")))[1]) < 2:
            assert time.monotonic() < deadline, "gateways never became alive"
            await asyncio.sleep(0.05)
        revision, alive = await probe.get_prefix(key("alive", ""))
        await probe.close()

        used = cluster_coordinator.current_etcd()
        cluster.members[cluster.index_of(used)].kill()
        killed_at = time.monotonic()

        writer = AppWriter(cluster_coordinator.admin(), "f")
        await writer.run(4.0, rate=10)
        assert writer.acked and min(writer.acked.values()) - killed_at < RESUME_BOUND
        assert cluster_coordinator.current_etcd() != used

        # no alive key was deleted (or re-created) since, though the lease TTL (2 s) went by:
        # every change from before the kill up to now, read back through a watch
        probe = store_for(cluster, first=(cluster.index_of(used) + 1) % 3)
        now, after = await probe.get_prefix(key("alive", ""))
        assert {kv.key: kv.create_revision for kv in after} == {kv.key: kv.create_revision for kv in alive}
        deletes = []
        async with asyncio.timeout(15):
            async for batch in probe.watch_prefix(PREFIX, revision + 1):
                assert not isinstance(batch, Compacted)
                deletes += [e.key for e in batch if e.value is None and e.key.startswith(key("alive", ""))]
                if batch[-1].mod_revision >= now:
                    break
        await probe.close()
        assert deletes == []


# -- linearizability -------------------------------------------------------------------------------

async def test_a_history_of_2000_operations_under_a_leader_kill_is_linearizable(cluster):
    # the benchmark's own history: writers and readers on stores starting at different members,
    # the leader killed at a quarter of the operations, restarted at half, the next leader at 3/4
    writes, reads, faults = await history(cluster, 2000)
    assert len(writes) + len(reads) >= 2000
    assert faults and faults[0].startswith("kill leader"), faults  # the fault happened
    assert len(reads) > 500 and sum(w.end is not None for w in writes) > 200
    violations = check(writes, reads)
    assert violations == [], violations[:5]

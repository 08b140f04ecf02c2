"""Fixtures shared by the whole suite: a real etcd, a PKI, coordinator processes.

`etcd`          a real etcd-server on free loopback ports with a temporary data dir (per test)
`pki`           a geomesh CA in a temporary directory (per session)
`coordinator_factory(**flags)`  starts a coordinator subprocess on that etcd; all stopped after
`coordinator`   one coordinator from the factory
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.etcd_process import EtcdProcess
from geomesh.pki import Identity, Pki

ROOT = Path(__file__).resolve().parent.parent


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
    return p


class CoordinatorProcess:
    """A `geomesh-coordinator` subprocess (real process, real mTLS port)."""

    def __init__(self, etcd: EtcdProcess, pki: Pki, workdir: Path, extra: list[str]) -> None:
        self.etcd = etcd
        self.pki = pki
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = workdir / "coordinator.log"
        self._channels: list[grpc.aio.Channel] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        listen = f"127.0.0.1:{self.port}" if self.port else "127.0.0.1:0"
        cmd = [sys.executable, "-m", "coordinator.main", "--etcd", self.etcd.endpoint, "--listen", listen,
               "--pki-dir", str(self.pki.dir), "--port-file", str(port_file), "--lease-ttl", "2", *self.extra]
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT, start_new_session=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {self.log_path.read_text()[-2000:]}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                return
            time.sleep(0.05)
        raise TimeoutError(f"coordinator did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

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

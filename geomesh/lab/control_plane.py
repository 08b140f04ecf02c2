"""The lab's control plane: embedded etcd, the PKI and a coordinator process, started in order.

Every process is started by us and recorded (PID) in the lab's state directory, so
`geomesh lab down` can stop exactly what the lab started, also after the lab itself crashed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from geomesh.lab.processes import EtcdProcess, ServiceProcess
from geomesh.pki import Pki

STATE_FILE = "lab-state.json"


@dataclass
class LabRecord:
    """What the lab made: PIDs, namespaces, interfaces (persisted after every change)."""

    path: Path
    pids: dict[str, int] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pids": self.pids, "namespaces": self.namespaces,
                                   "interfaces": self.interfaces}, indent=1))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> LabRecord:
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, dict(data.get("pids", {})), list(data.get("namespaces", [])), list(data.get("interfaces", [])))


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM then SIGKILL one process (group) that the lab started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)


class ControlPlane:
    def __init__(self, state_dir: Path, record: LabRecord) -> None:
        self.dir = state_dir
        self.record = record
        self.pki = Pki(state_dir / "pki")
        self.etcd = EtcdProcess(state_dir / "etcd", log_path=state_dir / "etcd.log")
        self.coordinator: ServiceProcess | None = None

    def start(self, lease_ttl: int = 2, extra: list[str] | None = None) -> None:
        self.pki.init()
        self.pki.server()
        self.etcd.start()
        assert self.etcd.proc is not None
        self.record.pids["etcd"] = self.etcd.proc.pid
        self.record.save()
        self.coordinator = ServiceProcess("coordinator.main", [
            "--etcd", self.etcd.endpoint, "--listen", "127.0.0.1:0", "--pki-dir", str(self.pki.dir),
            "--lease-ttl", str(lease_ttl), "--metrics-port", "0", *(extra or [])], self.dir, name="coordinator")
        self.coordinator.start()
        assert self.coordinator.pid is not None
        self.record.pids["coordinator"] = self.coordinator.pid
        self.record.save()

    @property
    def address(self) -> str:
        assert self.coordinator is not None
        return f"127.0.0.1:{self.coordinator.port}"

    def grpcurl_prefix(self) -> str:
        admin = self.pki.identity("admin", "lab-admin")
        return (f"grpcurl -cacert {admin.ca} -cert {admin.cert} -key {admin.key} "
                f"-servername geomesh-coordinator {self.address}")

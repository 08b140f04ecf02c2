"""The processes a coordinator benchmark runs: a real etcd and coordinator subprocesses, CPU-pinned.

Benchmarks on the 2-core project machine put the server under test on one CPU and the load
generator on the other (`taskset`), so a ratio measured in one run compares like with like.
This module starts etcd (`geomesh.lab.processes.EtcdProcess`) and pins it after the fact, starts
a coordinator (`python -m coordinator.main`, or any module speaking the same flags) under
`taskset` and waits for its port file, reads a process's CPU time from /proc, and stops only
the processes it started, by PID. Nothing here measures; `bench/_stats.py` does the arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from geomesh.lab.processes import EtcdProcess, ServiceProcess
from geomesh.pki import Pki

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
try:  # the CPUs this process may use before anything pins it
    CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))
except (AttributeError, OSError):
    CPUS = frozenset()


def parse_cpu(value: str) -> int | None:
    """A `--*-cpu` flag: a CPU number, or "none" for unpinned."""
    if value.lower() in ("none", "", "-1"):
        return None
    cpu = int(value)
    if cpu < 0:
        raise ValueError(f"CPU {value!r} must be >= 0 or 'none'")
    return cpu


def usable(cpu: int | None) -> int | None:
    """`cpu` when this machine lets us pin to it, else None (unpinned)."""
    return cpu if cpu is not None and cpu in CPUS else None


def pin_self(cpu: int | None) -> int | None:
    """Pin the calling process (and threads it starts later) to `cpu`; returns the CPU used."""
    cpu = usable(cpu)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return cpu


def pin_pid(pid: int, cpu: int | None) -> int | None:
    """Pin every thread of a running process to `cpu` (new threads inherit it)."""
    cpu = usable(cpu)
    if cpu is None:
        return None
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            pass  # a thread that just ended
    return cpu


def taskset_prefix(cpu: int | None) -> list[str]:
    cpu = usable(cpu)
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (all threads) so far; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """A scratch directory for data dirs, PKI and logs: temporary, or `keep` (created, left behind)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def make_pki(directory: Path) -> Pki:
    pki = Pki(directory)
    pki.init()
    pki.server()
    return pki


def start_etcd(workdir: Path, cpu: int | None) -> EtcdProcess:
    if shutil.which("etcd") is None:
        raise SystemExit("etcd is not installed: run scripts/install.sh (./run test does)")
    etcd = EtcdProcess(workdir / "etcd", log_path=workdir / "etcd.log")
    etcd.start()
    assert etcd.proc is not None
    pin_pid(etcd.proc.pid, cpu)
    return etcd


class CoordinatorProc(ServiceProcess):
    """A coordinator subprocess on `etcd`, mTLS with `pki`, optionally pinned and profiled.

    `module` is `coordinator.main` (the real one) or a bench variant accepting the same flags.
    `profile` writes a cProfile of the whole process to that path when it exits (SIGTERM).
    """

    def __init__(self, etcd: EtcdProcess, pki: Pki, workdir: Path, *, cpu: int | None = None,
                 lease_ttl: int = 30, module: str = "coordinator.main", extra: list[str] | None = None,
                 profile: Path | None = None, name: str = "coordinator") -> None:
        python = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile is not None else None
        super().__init__(module, ["--etcd", etcd.endpoint, "--listen", "127.0.0.1:0", "--pki-dir", str(pki.dir),
                                  "--lease-ttl", str(lease_ttl), "--log-level", "warning", *(extra or [])],
                         workdir, name=name, prefix=taskset_prefix(cpu), python=python)
        self.etcd = etcd
        self.pki = pki
        self.cpu = cpu
        self.lease_ttl = lease_ttl
        self.profile = profile

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        return super().stop(sig, timeout)

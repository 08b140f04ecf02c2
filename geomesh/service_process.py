"""A geomesh service as a child process: started with --port-file, ready when the file has the port.

Every geomesh server (`coordinator.main`, `geodns.main`, ...) writes its bound port to the file
named by `--port-file` once it serves, so a caller can bind port 0 and still learn the port.
`ServiceProcess` starts one (optionally under a command prefix such as `taskset -c 1`), waits for
that, and stops only the process it started, by PID (SIGTERM, then SIGKILL after a deadline).
Used by the lab, the tests and the benchmarks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    def __init__(self, module: str, args: Sequence[str], workdir: Path, *, name: str | None = None,
                 prefix: Sequence[str] = (), python: Sequence[str] | None = None) -> None:
        self.module = module
        self.args = list(args)
        self.workdir = Path(workdir)
        self.name = name or module.split(".")[0]
        self.prefix = list(prefix)
        self.python = list(python) if python is not None else [sys.executable]
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        cmd = [*self.prefix, *self.python, "-m", self.module, *self.args, "--port-file", str(port_file)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                     start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
                return self.port
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not start in {timeout}s: {self.log()[-2000:]}")

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stop the process (SIGKILL after `timeout`); returns its exit code (None: not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

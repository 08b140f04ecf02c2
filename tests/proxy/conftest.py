"""Fixtures for the data-plane tests: real backends, a real proxy on loopback, real processes.

`backends(n, **kw)`   n `Backend` servers (tests/proxy/backends.py), closed after the test
`gateway(data, **settings)`  a `ProxyServer` for the routes document `data` (the TOML shape as
                      a dict), running on its own uvloop loop in a thread, listening on
                      127.0.0.1 port 0; `.http`, `.https`, `.mesh` addresses, `.update(data)`
`gateway_process(routes_path, *flags)`  `geomesh-gateway --routes` as a subprocess; waits for its
                      "proxy listening" log line and parses the bound addresses
Every test: each state an in-process HTTP/1.1 client connection enters is checked against the
                      table of `conn_state` (tests/proxy/state_watch.py); a move it lacks fails the test
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from regional_gateway.proxy.routes_file import parse_routes
from regional_gateway.proxy.server import ProxyServer
from regional_gateway.proxy.settings import ProxySettings
from tests.proxy import state_watch
from tests.proxy.backends import Backend

FAST = dict(header_timeout=1.0, idle_timeout=5.0, connect_timeout=1.0, upstream_timeout=3.0, drain_timeout=2.0)


def routes_of(data: dict[str, Any], base: Path | None = None):
    routes, _ = parse_routes(data, base or Path.cwd())
    return routes


class RunningGateway:
    def __init__(self, data: dict[str, Any], base: Path, settings: dict[str, Any]) -> None:
        self.base = base
        # plain HTTP to hosts with certificates is routed here (the redirect to HTTPS: tests/proxy/test_port80.py)
        opts = {"http": ("127.0.0.1:0",), "https_redirect": False, **FAST, **settings}
        self.settings = ProxySettings(**opts)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.thread.start()
        self.server: ProxyServer = self.call(self._start(routes_of(data, base)))

    async def _start(self, routes) -> ProxyServer:
        server = ProxyServer(self.settings, routes)
        await server.start()
        return server

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn, *args):
        async def go():
            return fn(*args)
        return self.call(go())

    def addr(self, kind: str, i: int = 0) -> tuple[str, int]:
        return tuple(self.server.addresses[kind][i])  # type: ignore[return-value]

    @property
    def http(self) -> tuple[str, int]:
        return self.addr("http")

    @property
    def https(self) -> tuple[str, int]:
        return self.addr("https")

    @property
    def mesh(self) -> tuple[str, int]:
        return self.addr("mesh")

    def update(self, data: dict[str, Any]) -> None:
        routes = routes_of(data, self.base)
        self.run(self.server.update_routes, routes)

    def stop(self) -> None:
        if self.loop.is_running():
            self.call(self.server.shutdown(0.5))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture(autouse=True)
def connection_state_moves():
    watch = state_watch.install()
    watch.take_illegal()
    yield watch
    illegal = watch.take_illegal()
    assert not illegal, "client connection state moves not in conn_state's table:\n" + "\n".join(illegal[:5])


@pytest.fixture
def backends():
    made: list[Backend] = []

    def make(n: int = 1, prefix: str = "b", **kw) -> list[Backend]:
        out = [Backend(f"{prefix}{len(made) + i + 1}", **kw) for i in range(n)]
        made.extend(out)
        return out

    yield make
    for b in made:
        b.close()


@pytest.fixture
def gateway(tmp_path: Path):
    made: list[RunningGateway] = []

    def make(data: dict[str, Any], **settings: Any) -> RunningGateway:
        g = RunningGateway(data, tmp_path, settings)
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop()


class GatewayProcess:
    def __init__(self, routes: Path, flags: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w+b")  # noqa: SIM115 - kept open for the process's life
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "regional_gateway.main", "--routes", str(routes), *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for rec in self.records():
                if rec.get("msg") == "proxy listening":
                    for kind in ("http", "https", "mesh"):
                        self.addresses[kind] = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1]))
                                                for a in rec.get(kind, "").split()]
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.text()}")
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not start: {self.text()}")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_for_log(self, msg: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.records():
                if rec.get("msg") == msg:
                    return rec
            time.sleep(0.05)
        raise AssertionError(f"no log line {msg!r} within {timeout}s: {self.text()[-2000:]}")

    @property
    def http(self) -> tuple[str, int]:
        return self.addresses["http"][0]

    @property
    def mesh(self) -> tuple[str, int]:
        return self.addresses["mesh"][0]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def gateway_process(tmp_path: Path):
    made: list[GatewayProcess] = []

    def make(routes: Path, *flags: str) -> GatewayProcess:
        g = GatewayProcess(routes, list(flags), tmp_path / f"gateway-{len(made)}.log")
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop()

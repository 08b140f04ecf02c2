"""Outside-in reachability probes: this gateway checks other gateways the way a client reaches them.

For each target the probe plan (`geomesh.probe_plan`) assigns to this gateway, every `interval`
seconds: a TCP connection to the target's *public* address and proxy port (not the mesh), an
HTTP/1.1 request for the reserved path `HEALTH_PATH`, which a gateway answers itself with 200 and
its own name in `HEALTH_HEADER`, and, where the target serves HTTPS, a TLS handshake on that port
too. A probe fails on a refused or timed-out connection, a timeout of the whole exchange, any
other status, or an answer naming another gateway (a wrong address in the mesh, or an impostor).

Each target's verdict is debounced (`Debounce`): down after `fall` failed probes in a row, up
again after `rise` good ones. Only changes are reported (the agent sends them in the next
heartbeat, at once): a verdict change, the first RTT measured for an up target, and an RTT that
moved by more than 25 % (at most once per `rtt_refresh`): the coordinator decides by quorum of regions
(`coordinator.reachability`). The prober never waits on the control plane and runs beside the
data plane on the same loop; each probe is bounded by `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from geomesh.logs import event

log = logging.getLogger("geomesh.gateway.reach")

HEALTH_PATH = "/.well-known/geomesh/health"
HEALTH_HEADER = "x-geomesh-gateway"

PROBES = Counter("geomesh_gateway_reach_probes_total", "outside-in probes of other gateways",
                 ["target_region", "target", "result"])
RTT = Histogram("geomesh_gateway_reach_probe_seconds", "round-trip time of successful outside-in probes",
                ["target_region", "target"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
VERDICTS = Counter("geomesh_gateway_reach_verdict_changes_total", "debounced verdict changes about other gateways",
                   ["target", "up"])


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """Another gateway as clients reach it."""

    name: str
    region: str
    host: str             # public IPv4 (or IPv6) address
    http_port: int        # plain HTTP port clients use
    https_port: int = 0   # TLS port, 0 when none
    sni: str = ""         # a name the target serves a certificate for (any, for the handshake)


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    interval: float = 0.5
    timeout: float = 0.5
    fall: int = 3   # failed probes in a row before a target is reported down
    rise: int = 2   # good probes in a row before it is reported up again
    rtt_refresh: float = 10.0  # seconds between RTT reports of an up target whose RTT moved by > 25 %


class Debounce:
    """Consecutive-result hysteresis for one target. Pure; starts up (innocent until proven)."""

    __slots__ = ("fall", "rise", "up", "_fails", "_goods")

    def __init__(self, fall: int, rise: int) -> None:
        if fall < 1 or rise < 1:
            raise ValueError("fall and rise must be at least 1")
        self.fall, self.rise = fall, rise
        self.up = True
        self._fails = self._goods = 0

    def observe(self, ok: bool) -> bool:
        """Feed one probe result; True when the verdict changed."""
        if ok:
            self._fails, self._goods = 0, self._goods + 1
            if not self.up and self._goods >= self.rise:
                self.up = True
                return True
        else:
            self._goods, self._fails = 0, self._fails + 1
            if self.up and self._fails >= self.fall:
                self.up = False
                return True
        return False


def rtt_report_due(last: tuple[float, float] | None, rtt_ms: float, now: float, refresh: float) -> bool:
    """Whether an up target's RTT should be reported although its verdict did not change: never
    reported yet, or moved by more than 25 % and the last report is `refresh` seconds old."""
    if last is None or last[0] <= 0:
        return True
    reported, at = last
    return now - at >= refresh and abs(rtt_ms - reported) > 0.25 * reported


def health_response(name: str) -> bytes:
    """What a gateway answers on `HEALTH_PATH` (the data plane serves it for any Host)."""
    body = f"{name}\n".encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncache-control: no-store\r\n"
            + f"{HEALTH_HEADER}: {name}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)


def check_answer(data: bytes, expected: str) -> str | None:
    """None when `data` (a complete response head, maybe more) is the expected gateway's health
    answer, else why not."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        return f"status {lines[0][:40]!r}"
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == HEALTH_HEADER:
            got = value.strip()
            return None if got == expected else f"answered by {got[:64]!r}"
    return "no gateway name in the answer"


async def probe_once(target: ProbeTarget, timeout: float, tls: ssl.SSLContext | None) -> tuple[bool, float, str]:
    """One probe: (ok, seconds, why-not)."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(target.host, target.http_port)
            try:
                writer.write(f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {target.name}\r\nConnection: close\r\n"
                             f"User-Agent: geomesh-reach\r\n\r\n".encode())
                data = await reader.readuntil(b"\r\n\r\n")
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            why = check_answer(data, target.name)
            if why is None and target.https_port and tls is not None:
                _, w = await asyncio.open_connection(target.host, target.https_port, ssl=tls,
                                                     server_hostname=target.sni or target.name)
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
    except TimeoutError:
        return False, time.monotonic() - start, "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError) as exc:
        return False, time.monotonic() - start, type(exc).__name__
    if why is not None:
        return False, time.monotonic() - start, why
    return True, time.monotonic() - start, ""


def probe_tls_context() -> ssl.SSLContext:
    """The handshake checks that the TLS listener answers, not who signed its certificate: the
    name check is the HTTP answer's job."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ReachProber:
    """Probes the targets it is given (`set_targets`) and calls `on_change(target, up, rtt_ms)`
    for every debounced verdict change. `results()` is the current verdict of every target."""

    def __init__(self, settings: ProbeSettings, on_change: Callable[[str, bool, float], None]) -> None:
        self.settings = settings
        self.on_change = on_change
        self.targets: dict[str, ProbeTarget] = {}
        self.state: dict[str, Debounce] = {}
        self.rtt_ms: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._reported: dict[str, tuple[float, float]] = {}  # target -> (RTT last reported, when)
        self._tls = probe_tls_context()

    def set_targets(self, targets: Mapping[str, ProbeTarget]) -> None:
        for name in list(self._tasks):
            if name not in targets or targets[name] != self.targets.get(name):
                self._tasks.pop(name).cancel()
                self.state.pop(name, None)
                self.rtt_ms.pop(name, None)
                self._reported.pop(name, None)
        self.targets = dict(targets)
        for name, target in self.targets.items():
            if name not in self._tasks:
                self.state[name] = Debounce(self.settings.fall, self.settings.rise)
                self._tasks[name] = asyncio.create_task(self._loop(target), name=f"reach-probe-{name}")

    def results(self) -> dict[str, tuple[bool, float]]:
        return {n: (d.up, self.rtt_ms.get(n, 0.0)) for n, d in self.state.items()}

    async def _loop(self, target: ProbeTarget) -> None:
        s = self.settings
        # spread the first probes over the interval so N targets do not fire at once
        await asyncio.sleep((hash(target.name) % 1000) / 1000 * s.interval)
        while True:
            started = time.monotonic()
            ok, seconds, why = await probe_once(target, s.timeout, self._tls)
            PROBES.labels(target.region, target.name, "ok" if ok else "fail").inc()
            if ok:
                RTT.labels(target.region, target.name).observe(seconds)
                self.rtt_ms[target.name] = round(seconds * 1000, 3)
            deb = self.state.get(target.name)
            if deb is None:
                return
            if deb.observe(ok):
                VERDICTS.labels(target.name, str(deb.up).lower()).inc()
                event(log, "reachability verdict changed", target=target.name, up=deb.up, why=why or None)
                reported = self.rtt_ms.get(target.name, 0.0) if deb.up else 0.0
                self.on_change(target.name, deb.up, reported)
                self._reported[target.name] = (reported, time.monotonic())
            elif ok and deb.up and rtt_report_due(self._reported.get(target.name), self.rtt_ms[target.name],
                                                  time.monotonic(), s.rtt_refresh):
                # the verdict stands; its RTT is news (first measured, or moved): report it too
                self.on_change(target.name, True, self.rtt_ms[target.name])
                self._reported[target.name] = (self.rtt_ms[target.name], time.monotonic())
            await asyncio.sleep(max(0.0, s.interval - (time.monotonic() - started)))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

"""Outside-in probes (`regional_gateway.reach_prober`) against real sockets on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from regional_gateway.reach_prober import (
    Debounce,
    ProbeSettings,
    ProbeTarget,
    ReachProber,
    check_answer,
    health_response,
    probe_once,
    rtt_report_due,
)


@pytest.mark.parametrize("results,fall,rise,changes,final", [
    ("ffff", 3, 2, [2], False),          # down at the third failure in a row
    ("ffgff", 3, 2, [], True),           # a good probe resets the count
    ("fffgg", 3, 2, [2, 4], True),       # back up after two good ones
    ("fffgfg", 3, 2, [2], False),        # a single good probe between failures is not enough
    ("g" * 5, 1, 1, [], True),
    ("fgfg", 1, 1, [0, 1, 2, 3], True),
])
def test_debounce(results: str, fall: int, rise: int, changes: list[int], final: bool) -> None:
    d = Debounce(fall, rise)
    seen = [i for i, r in enumerate(results) if d.observe(r == "g")]
    assert seen == changes and d.up is final


@pytest.mark.parametrize("data,why", [
    (health_response("gw-a"), None),
    (health_response("gw-b"), "answered by 'gw-b'"),
    (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", "status 'HTTP/1.1 404 Not Found'"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", "no gateway name in the answer"),
])
def test_check_answer(data: bytes, why: str | None) -> None:
    assert check_answer(data, "gw-a") == why


async def _health_server(name: str, *, stall: bool = False) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if stall:
            await asyncio.sleep(5)
        writer.write(health_response(name))
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_probe_once_outcomes() -> None:
    good = await _health_server("gw-a")
    impostor = await _health_server("gw-x")
    stalled = await _health_server("gw-a", stall=True)
    port = lambda srv: srv.sockets[0].getsockname()[1]  # noqa: E731
    try:
        ok, _, why = await probe_once(ProbeTarget("gw-a", "eu", "127.0.0.1", port(good)), 1.0, None)
        assert ok and why == ""
        ok, _, why = await probe_once(ProbeTarget("gw-a", "eu", "127.0.0.1", port(impostor)), 1.0, None)
        assert not ok and "gw-x" in why
        ok, secs, why = await probe_once(ProbeTarget("gw-a", "eu", "127.0.0.1", port(stalled)), 0.3, None)
        assert not ok and why == "timeout" and secs < 2
        ok, _, why = await probe_once(ProbeTarget("gw-a", "eu", "127.0.0.1", _free_port()), 1.0, None)
        assert not ok and why == "ConnectionRefusedError"
    finally:
        for s in (good, impostor, stalled):
            s.close()


async def test_prober_reports_only_changes() -> None:
    srv = await _health_server("gw-a")
    port = srv.sockets[0].getsockname()[1]
    changes: asyncio.Queue = asyncio.Queue()
    prober = ReachProber(ProbeSettings(interval=0.05, timeout=0.5, fall=2, rise=2),
                         lambda name, up, rtt: changes.put_nowait((name, up, rtt)))
    prober.set_targets({"gw-a": ProbeTarget("gw-a", "eu", "127.0.0.1", port)})
    try:
        name, up, rtt = await asyncio.wait_for(changes.get(), 5)
        assert (name, up) == ("gw-a", True) and rtt > 0  # up from the start; its first RTT is news
        await asyncio.sleep(0.4)
        assert changes.empty()  # nothing changed since (the RTT refresh is 10 s)
        assert prober.results()["gw-a"][0] is True and prober.results()["gw-a"][1] > 0
        srv.close()
        await srv.wait_closed()
        name, up, rtt = await asyncio.wait_for(changes.get(), 5)
        assert (name, up, rtt) == ("gw-a", False, 0.0)
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)  # answers nothing: still down
        srv.close()
        srv = await _health_server("gw-a")  # a new port: the target moved
        prober.set_targets({"gw-a": ProbeTarget("gw-a", "eu", "127.0.0.1", srv.sockets[0].getsockname()[1])})
        await asyncio.sleep(0.4)
        assert prober.results()["gw-a"][0] is True  # a changed target starts afresh
    finally:
        await prober.close()
        srv.close()


@pytest.mark.parametrize("last,rtt,now,due", [
    (None, 5.0, 0.0, True),            # never reported
    ((0.0, 0.0), 5.0, 1.0, True),      # reported while unknown (0)
    ((5.0, 0.0), 9.0, 5.0, False),     # moved, but the last report is recent
    ((5.0, 0.0), 9.0, 10.0, True),     # moved by 80 % and 10 s old
    ((5.0, 0.0), 6.0, 60.0, False),    # moved by 20 %: not news
])
def test_rtt_report_due(last, rtt: float, now: float, due: bool) -> None:
    assert rtt_report_due(last, rtt, now, 10.0) is due

"""Backend health through the real proxy: a killed backend under load, active probes, passive ejection,
re-admission; plus the pure health state machine."""

from __future__ import annotations

import threading
import time
from collections import Counter

from regional_gateway.proxy.health import Health, HealthState
from regional_gateway.proxy.routes import HealthCheck
from tests.proxy.client import Conn, get

ZONE = "apps.test"


def routes(backends: list, **health) -> dict:
    return {"zone": ZONE, "health": health, "apps": [{"name": "shop", "backends": backends}]}


class Load:
    """`workers` clients sending requests back to back (keep-alive) for at most `seconds`, bounded in count."""

    def __init__(self, addr, host: str, workers: int = 4, seconds: float = 6.0, max_requests: int = 20000) -> None:
        self.addr, self.host = addr, host
        self.results: list[tuple[float, int, str]] = []
        self.stop_at = time.monotonic() + seconds
        self.budget = max_requests
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        conn = None
        while time.monotonic() < self.stop_at:
            with self.lock:
                if self.budget <= 0:
                    return
                self.budget -= 1
            try:
                if conn is None:
                    conn = Conn(self.addr, timeout=5)
                r = conn.request(self.host)
                status, who = r.status, r.header("x-backend") or "-"
                if r.header("connection") == "close":
                    conn.close()
                    conn = None
            except OSError as exc:
                status, who = 599, type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.results.append((time.monotonic(), status, who))
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    def join(self) -> None:
        for t in self.threads:
            t.join(15)


def test_killed_backend_under_load_then_restarted(backends, gateway):
    bs = backends(3)
    g = gateway(routes([b.address for b in bs], check="tcp", interval=0.2, timeout=0.5, fall=1, rise=1,
                       eject_seconds=1.0))
    load = Load(g.http, f"shop.{ZONE}", seconds=4.5)
    time.sleep(1.0)
    killed_at = time.monotonic()
    bs[1].stop()
    time.sleep(1.5)
    hits_before_restart = bs[1].hits
    restarted_at = time.monotonic()
    bs[1].start()
    load.join()
    detection = 0.5  # probe interval 0.2 s + one sweep; requests failing inside it are retried anyway
    after = [(t, s, w) for t, s, w in load.results if t > killed_at + detection]
    bad = [(round(t - killed_at, 3), s, w) for t, s, w in after if s >= 500]
    assert not bad, bad[:10]
    assert all(s == 200 for _, s, _ in load.results), Counter(s for _, s, _ in load.results)
    served_while_dead = Counter(w for t, s, w in load.results if killed_at + detection < t < restarted_at)
    assert served_while_dead["b2"] == 0 and served_while_dead["b1"] > 0 and served_while_dead["b3"] > 0
    back = Counter(w for t, s, w in load.results if t > restarted_at + 1.0)
    assert back["b2"] > 0, back  # re-admitted: it gets traffic again
    assert bs[1].hits > hits_before_restart


def test_http_probe_marks_down_and_up(backends, gateway):
    b1, b2 = backends(2)
    g = gateway(routes([b1.address, b2.address], check="http", path="/health", interval=0.1, timeout=0.5,
                       fall=2, rise=2))
    b1.sick = True
    deadline = time.monotonic() + 5
    while g.run(lambda: g.server.state.apps["shop"].backends[0].available) and time.monotonic() < deadline:
        time.sleep(0.05)
    with Conn(g.http) as c:
        assert {c.request(f"shop.{ZONE}").header("x-backend") for _ in range(10)} == {"b2"}
    reason = g.run(lambda: g.server.state.apps["shop"].backends[0].health.reason)
    assert "HTTP 503" in reason
    b1.sick = False
    deadline = time.monotonic() + 5
    while not g.run(lambda: g.server.state.apps["shop"].backends[0].available) and time.monotonic() < deadline:
        time.sleep(0.05)
    with Conn(g.http) as c:
        assert {c.request(f"shop.{ZONE}").header("x-backend") for _ in range(10)} == {"b1", "b2"}


def test_5xx_burst_ejects_then_readmits(backends, gateway):
    b1, b2 = backends(2)
    g = gateway(routes([b1.address, b2.address], check="none", eject_5xx=3, eject_seconds=1.0))
    b1.fail_status = 500
    with Conn(g.http) as c:
        statuses = Counter(c.request(f"shop.{ZONE}").status for _ in range(40))
    assert statuses[500] == 3 and statuses[200] == 37
    b1.fail_status = 0
    time.sleep(1.5)  # ejection over: b1 is tried again
    with Conn(g.http) as c:
        assert Counter(c.request(f"shop.{ZONE}").header("x-backend") for _ in range(10)) == {"b1": 5, "b2": 5}


def test_connect_failure_is_retried_and_ejects(backends, gateway):
    b1, b2 = backends(2)
    b1.stop()
    g = gateway(routes([b1.address, b2.address], check="none", eject_seconds=30))
    for _ in range(10):
        r = get(g.http, f"shop.{ZONE}")
        assert r.status == 200 and r.header("x-backend") == "b2"
    state = g.run(lambda: g.server.state.apps["shop"].backends[0].health.state)
    assert state is Health.EJECTED


def test_health_state_machine():
    h = HealthState(HealthCheck(rise=2, fall=2, eject_connect_failures=2, eject_5xx=3, eject_seconds=10))
    assert h.available and h.state is Health.UP
    assert not h.probe(False, 0)
    assert h.probe(False, 1) and h.state is Health.DOWN
    assert not h.probe(True, 2) and not h.available
    assert h.probe(True, 3) and h.available
    assert not h.connect_failed(4) and h.connect_failed(5) and h.state is Health.EJECTED
    assert not h.expire(14) and h.expire(15.1) and h.available
    h.connected()
    assert not h.response(502, 20) and not h.response(200, 20)
    assert not h.response(500, 21) and not h.response(503, 21) and h.response(504, 21)
    assert "3 consecutive 5xx" in h.reason
    none = HealthState(HealthCheck(check="none", eject_connect_failures=0, eject_5xx=0))
    assert not any(none.connect_failed(t) for t in range(20)) and none.available

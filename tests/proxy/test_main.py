"""`geomesh-gateway` as a process: flags, config errors, SIGHUP reload, SIGTERM drain, metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from regional_gateway.proxy.settings import ProxySettings
from tests.proxy.client import Conn, get

ZONE = "apps.test"


def write_routes(path: Path, apps: dict[str, list[str]], extra: str = "") -> Path:
    lines = [f'zone = "{ZONE}"', 'name = "gw-test"', "[health]", 'check = "none"']
    for name, backends in apps.items():
        lines += ["[[apps]]", f'name = "{name}"', "backends = [" + ", ".join(f'"{b}"' for b in backends) + "]"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regional_gateway.main", *args], capture_output=True, text=True,
                          timeout=60)


def test_help_explains_every_flag():
    out = run_cli("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for name in ProxySettings.field_names():
        assert "--" + name.replace("_", "-") in text, name
    for flag in ("--routes", "--config", "--metrics-port", "--log-level", "--check"):
        assert flag in text


def test_invalid_routes_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'zone = "{ZONE}"\n[[apps]]\nname = "shop"\nbackends = ["127.0.0.1:99999"]\n')
    out = run_cli("--routes", str(bad), "--check")
    assert out.returncode == 2 and "apps[0].backends[0].port" in out.stderr and "99999" in out.stderr
    bad.write_text(f'zone = "{ZONE}"\n[server]\nheader_timeout = -1\n')
    out = run_cli("--routes", str(bad), "--check")
    assert out.returncode == 2 and "header_timeout" in out.stderr
    good = write_routes(tmp_path / "good.toml", {"shop": ["127.0.0.1:8000"]})
    out = run_cli("--routes", str(good), "--check")
    assert out.returncode == 0 and "ok" in out.stdout
    out = run_cli("--routes", str(good), "--check", "--idle-timeout", "0")
    assert out.returncode == 2 and "idle_timeout" in out.stderr


def test_config_mode_hands_over_to_the_agent(tmp_path):
    missing = tmp_path / "nope.toml"
    out = run_cli("--config", str(missing))
    assert out.returncode == 2 and "nope.toml" in (out.stdout + out.stderr)


def test_sighup_reloads_without_dropping_connections(backends, gateway_process, tmp_path):
    b1, b2 = backends(2)
    routes = write_routes(tmp_path / "routes.toml", {"shop": [b1.address]})
    g = gateway_process(routes, "--http", "127.0.0.1:0")
    with Conn(g.http) as c:
        assert c.request(f"shop.{ZONE}").body == b"b1"
        assert c.request(f"blog.{ZONE}").status == 404
        write_routes(routes, {"shop": [b1.address], "blog": [b2.address]})
        g.signal(signal.SIGHUP)
        g.wait_for_log("routes updated")
        assert c.request(f"blog.{ZONE}").body == b"b2"  # same connection, new routes
        # an invalid file is refused, naming the field, and the routes in service stay
        routes.write_text(f'zone = "{ZONE}"\n[[apps]]\nname = "Bad Name"\n')
        g.signal(signal.SIGHUP)
        rec = g.wait_for_log("routes reload refused, keeping the routes in service")
        assert rec["field"] == "apps[0].name" and "Bad Name" in rec["error"]
        assert c.request(f"blog.{ZONE}").body == b"b2"
        assert c.request(f"shop.{ZONE}").body == b"b1"


def test_sigterm_drains_in_flight_requests(backends, gateway_process, tmp_path):
    (b,) = backends(1)
    routes = write_routes(tmp_path / "routes.toml", {"shop": [b.address]})
    g = gateway_process(routes, "--http", "127.0.0.1:0", "--drain-timeout", "5")
    idle = Conn(g.http)
    assert idle.request(f"shop.{ZONE}").status == 200
    result = {}

    def slow() -> None:
        result["r"] = get(g.http, f"shop.{ZONE}", "/slow?ms=1200")

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 5
    while b.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    g.signal(signal.SIGTERM)
    assert idle.closed_by_peer()  # idle keep-alive connections are closed at once
    t.join(10)
    assert result["r"].status == 200 and result["r"].body == b"b1"  # the request in flight finished
    assert g.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    idle.close()
    try:
        get(g.http, f"shop.{ZONE}", timeout=2)
        raise AssertionError("the gateway still accepts connections after exiting")
    except OSError:
        pass


def test_metrics_endpoint(backends, gateway_process, tmp_path):
    (b,) = backends(1)
    routes = write_routes(tmp_path / "routes.toml", {"shop": [b.address]})
    g = gateway_process(routes, "--http", "127.0.0.1:0", "--metrics-port", "0")
    address = g.wait_for_log("metrics listening")["address"]
    with Conn(g.http) as c:
        for _ in range(3):
            assert c.request(f"shop.{ZONE}").status == 200
        assert c.request(f"nope.{ZONE}").status == 404
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    assert f'geomesh_gateway_requests_total{{app="shop",backend="{b.address}",code="200"}} 3.0' in text
    assert 'geomesh_gateway_requests_total{app="-",backend="-",code="404"} 1.0' in text
    assert 'geomesh_gateway_errors_total{cause="unknown-host"} 1.0' in text
    assert f'geomesh_gateway_backend_up{{app="shop",backend="{b.address}",state="up"}} 1.0' in text
    assert 'geomesh_gateway_active_connections{listener="http"} 1.0' in text
    assert 'geomesh_gateway_upstream_latency_seconds_count{app="shop"} 3.0' in text

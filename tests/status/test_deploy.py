"""The shipped Grafana dashboard and Prometheus alert rules: every metric the dashboard (and the
rules) query exists in the code, and the rules pass `promtool check rules` and `promtool test rules`
(deploy/prometheus/alerts_test.yml: series for the etcd, SERVFAIL, 5xx, unreachable-gateway and
no-healthy-backend alerts, each firing when it should and not before)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "geomesh.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PACKAGES = ("coordinator", "geodns", "regional_gateway", "geomesh", "status_page")
SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum")
# families made at scrape time by custom collectors: their definitions are found in the source
FAMILY_DEF = re.compile(r'(?:MetricFamily|Counter|Gauge|Histogram|Summary)\(\s*"([a-z_:][a-z0-9_:]*)"')
EXTERNAL: tuple[str, ...] = ()  # metrics of other exporters the rules use (none now)


def _code_metric_names() -> set[str]:
    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(module.__path__, pkg + "."):
            if ".lab" in info.name or info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
    names = set(REGISTRY._names_to_collectors)  # every sample name of every registered collector
    from geodns.metrics import GeoDnsCollector
    from geodns.tcp_admission import TcpAbuseCollector
    scratch = CollectorRegistry()  # the DNS collectors are registered only when a server runs
    scratch.register(GeoDnsCollector(lambda: {"queries": {}, "cache_hits": 0, "cache_misses": 0,
                                              "dropped": 0, "rrl": {}}))
    scratch.register(TcpAbuseCollector(dict))
    for family in scratch.collect():
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES)
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for name in FAMILY_DEF.findall(path.read_text()):
                base = name.removesuffix("_total")
                names.update({base, *(base + s for s in SUFFIXES)})
    return names


def _queried(exprs: list[str]) -> set[str]:
    """Metric names in PromQL expressions: identifiers followed by { or [ or standing alone, minus
    functions, keywords and label names inside braces or by/without clauses."""
    out: set[str] = set()
    for expr in exprs:
        stripped = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
        stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
        for ident in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
            if "_" in ident and (ident.startswith(("geomesh_", "geodns_")) or ident in EXTERNAL):
                out.add(ident)
    return out


def test_every_metric_the_dashboard_queries_exists_in_the_code():
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 30
    queried = _queried(exprs)
    assert {"geodns_queries_total", "geomesh_gateway_requests_total", "geomesh_mesh_peer_handshake_age_seconds",
            "geomesh_coordinator_watch_lag_seconds_bucket", "geomesh_coordinator_etcd_connected"} <= queried
    missing = sorted(queried - _code_metric_names())
    assert missing == [], f"the dashboard queries metrics no code defines: {missing}"


def test_every_geomesh_metric_the_alerts_use_exists_in_the_code():
    exprs = re.findall(r"expr: (?:>-\n)?((?:.+\n)+?)\s+for:", ALERTS.read_text())
    assert len(exprs) == 8
    queried = _queried(exprs) - set(EXTERNAL)
    missing = sorted(queried - _code_metric_names())
    assert missing == [], f"the alert rules use metrics no code defines: {missing}"


def test_the_checker_catches_a_made_up_metric():
    assert _queried(['sum(rate(geomesh_no_such_thing_total{job="x"}[5m])) by (app)']) == {
        "geomesh_no_such_thing_total"}
    assert "geomesh_no_such_thing_total" not in _code_metric_names()


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run scripts/install.sh (Debian package prometheus)")
    return path


def test_promtool_check_rules():
    run = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 8 rules found" in run.stdout


def test_promtool_test_rules():
    run = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=ALERTS.parent,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_test_rules_fails_when_an_alert_would_not_fire(tmp_path):
    broken = ALERTS.read_text().replace("geomesh_coordinator_etcd_connected{job=\"geomesh-coordinator\"} == 0",
                                        "geomesh_coordinator_etcd_connected{job=\"geomesh-coordinator\"} == 2")
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(ALERTS.parent / "alerts_test.yml", tmp_path / "alerts_test.yml")
    run = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "GeomeshEtcdDisconnected" in run.stdout + run.stderr

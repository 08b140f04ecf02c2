"""Writes deploy/grafana/geomesh.json, the Grafana dashboard of the three services and the status page.

The dashboard is generated so its panels stay uniform (one datasource variable, one layout rule);
edit the PANELS table and re-run `.venv/bin/python deploy/grafana/make_dashboard.py`. Every metric
a query names must exist in the code: tests/status/test_deploy.py checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "geomesh.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# (row title, [(panel title, unit, [(legend, expr)], kind)])
PANELS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    ("GeoDNS", [
        ("DNS queries/s by rcode", "reqps", [("{{rcode}}", 'sum by (rcode) (rate(geodns_queries_total{job=~"$dns_job"}[1m]))')], "ts"),
        ("DNS queries/s by region answered", "reqps", [("{{region}}", 'sum by (region) (rate(geodns_queries_total{job=~"$dns_job"}[1m]))')], "ts"),
        ("SERVFAIL share", "percentunit", [("SERVFAIL", 'sum(rate(geodns_queries_total{job=~"$dns_job",rcode="SERVFAIL"}[5m])) / clamp_min(sum(rate(geodns_queries_total{job=~"$dns_job"}[5m])), 1e-9)')], "ts"),
        ("Answer cache hit ratio", "percentunit", [("{{instance}}", 'geodns_cache_hit_ratio{job=~"$dns_job"}')], "ts"),
        ("Cache bytes and evictions/s", "bytes", [("{{cache}} bytes", 'sum by (cache) (geodns_cache_bytes{job=~"$dns_job"})'), ("{{cache}} evictions/s", 'sum by (cache) (rate(geodns_cache_evictions_total{job=~"$dns_job"}[5m]))')], "ts"),
        ("Routing map: revision served and feed", "short", [("revision {{instance}}", 'geodns_table_revision{job=~"$dns_job"}'), ("feed connected {{instance}}", 'geodns_feed_connected{job=~"$dns_job"}'), ("updates/s {{instance}}", 'rate(geodns_feed_updates_total{job=~"$dns_job"}[5m])')], "ts"),
        ("Fail-open answers/s, RRL, drops", "reqps", [("fail-open", 'sum(rate(geomesh_dns_fail_open_total{job=~"$dns_job"}[5m]))'), ("rrl {{action}}", 'sum by (action) (rate(geodns_rrl_total{job=~"$dns_job"}[5m]))'), ("dropped", 'sum(rate(geodns_dropped_total{job=~"$dns_job"}[5m]))')], "ts"),
        ("TCP connections and refusals", "short", [("open", 'sum(geodns_tcp_connections{job=~"$dns_job"})'), ("refused {{reason}}/s", 'sum by (reason) (rate(geodns_tcp_refused_total{job=~"$dns_job"}[5m]))')], "ts"),
    ]),
    ("Gateway proxy", [
        ("Requests/s per app", "reqps", [("{{app}}", 'sum by (app) (rate(geomesh_gateway_requests_total{job=~"$gateway_job"}[1m]))')], "ts"),
        ("Status per app", "reqps", [("{{app}} {{code}}", 'sum by (app, code) (rate(geomesh_gateway_requests_total{job=~"$gateway_job"}[1m]))')], "ts"),
        ("5xx share per app", "percentunit", [("{{app}}", 'sum by (app) (rate(geomesh_gateway_requests_total{job=~"$gateway_job",code=~"5.."}[5m])) / clamp_min(sum by (app) (rate(geomesh_gateway_requests_total{job=~"$gateway_job"}[5m])), 1e-9)')], "ts"),
        ("Upstream latency p50 / p95 / p99 per app", "s", [(f"{{{{app}}}} p{q}", f'histogram_quantile(0.{q}, sum by (app, le) (rate(geomesh_gateway_upstream_latency_seconds_bucket{{job=~"$gateway_job"}}[5m])))') for q in ("50", "95", "99")], "ts"),
        ("Errors/s by cause", "reqps", [("{{cause}}", 'sum by (cause) (rate(geomesh_gateway_errors_total{job=~"$gateway_job"}[5m]))')], "ts"),
        ("Open client connections", "short", [("{{listener}}", 'sum by (listener) (geomesh_gateway_active_connections{job=~"$gateway_job"})')], "ts"),
        ("Backends taking traffic", "short", [("{{app}}", 'sum by (app) (geomesh_gateway_backend_up{job=~"$gateway_job"})')], "ts"),
        ("Cross-region forwards/s and fail-open", "reqps", [("{{region}}", 'sum by (region) (rate(geomesh_gateway_forwarded_total{job=~"$gateway_job"}[5m]))'), ("fail-open {{region}}", 'sum by (region) (rate(geomesh_gateway_forward_fail_open_total{job=~"$gateway_job"}[5m]))')], "ts"),
    ]),
    ("Mesh", [
        ("WireGuard handshake age, oldest per gateway", "s", [("{{instance}}", 'max by (instance) (geomesh_mesh_peer_handshake_age_seconds{job=~"$gateway_job"})')], "ts"),
        ("Handshake age per peer", "s", [("{{instance}} -> {{peer}}", 'geomesh_mesh_peer_handshake_age_seconds{job=~"$gateway_job"}')], "ts"),
        ("Peers configured, applies and errors", "short", [("peers {{instance}}", 'geomesh_mesh_peers_configured{job=~"$gateway_job"}'), ("apply errors/s", 'sum(rate(geomesh_mesh_apply_errors_total{job=~"$gateway_job"}[5m]))')], "ts"),
        ("Reachability probes/s by result", "reqps", [("{{result}}", 'sum by (result) (rate(geomesh_gateway_reach_probes_total{job=~"$gateway_job"}[5m]))')], "ts"),
        ("Gateways' coordinator link", "short", [("connected {{instance}}", 'geomesh_gateway_coordinator_connected{job=~"$gateway_job"}'), ("reconnects/s", 'sum(rate(geomesh_gateway_reconnects_total{job=~"$gateway_job"}[5m]))')], "ts"),
    ]),
    ("Coordinator", [
        ("Admin requests/s by method and code", "reqps", [("{{method}} {{code}}", 'sum by (method, code) (rate(geomesh_coordinator_requests_total{job=~"$coordinator_job"}[1m]))')], "ts"),
        ("Writes to etcd/s", "ops", [("admin writes", 'sum(rate(geomesh_coordinator_requests_total{job=~"$coordinator_job",method=~".*(Create|Update|Delete|Add|Remove|Drain|Activate|Register).*"}[1m]))'), ("vote writes {{result}}", 'sum by (result) (rate(geomesh_coordinator_reach_vote_writes_total{job=~"$coordinator_job"}[1m]))'), ("health batches {{result}}", 'sum by (result) (rate(geomesh_coordinator_health_batches_total{job=~"$coordinator_job"}[1m]))')], "ts"),
        ("Watch lag p50 / p99", "s", [(f"p{q}", f'histogram_quantile(0.{q}, sum by (le) (rate(geomesh_coordinator_watch_lag_seconds_bucket{{job=~"$coordinator_job"}}[5m])))') for q in ("50", "99")], "ts"),
        ("Sessions", "short", [("{{kind}}", 'sum by (kind) (geomesh_coordinator_sessions{job=~"$coordinator_job"})')], "ts"),
        ("Streams: messages/s and slow readers dropped", "short", [("{{kind}} {{type}}", 'sum by (kind, type) (rate(geomesh_coordinator_stream_messages_total{job=~"$coordinator_job"}[1m]))'), ("dropped {{kind}}", 'sum by (kind) (rate(geomesh_coordinator_slow_readers_dropped_total{job=~"$coordinator_job"}[5m]))')], "ts"),
        ("Reachability: unreachable, panic-held, cut-off regions", "short", [("unreachable", 'max(geomesh_coordinator_reach_unreachable{job=~"$coordinator_job"})'), ("panic held", 'max(geomesh_coordinator_reach_panic_held{job=~"$coordinator_job"})'), ("cut-off regions", 'max(geomesh_coordinator_reach_cut_off_regions{job=~"$coordinator_job"})')], "ts"),
    ]),
    ("etcd", [
        ("etcd connected per replica", "short", [("{{instance}}", 'geomesh_coordinator_etcd_connected{job=~"$coordinator_job"}')], "ts"),
        ("etcd errors/s", "ops", [("{{instance}}", 'sum by (instance) (rate(geomesh_etcd_errors_total{job=~"$coordinator_job"}[5m]))')], "ts"),
        ("etcd request p99", "s", [("p99", 'histogram_quantile(0.99, sum by (le) (rate(geomesh_etcd_request_seconds_bucket{job=~"$coordinator_job"}[5m])))')], "ts"),
        ("Cache revision per replica", "short", [("{{instance}}", 'geomesh_coordinator_cache_revision{job=~"$coordinator_job"}')], "ts"),
    ]),
    ("Status page", [
        ("Viewers and drops", "short", [("viewers", 'sum(geomesh_status_viewers{job=~"$status_job"})'), ("dropped {{reason}}/s", 'sum by (reason) (rate(geomesh_status_viewers_dropped_total{job=~"$status_job"}[5m]))')], "ts"),
        ("Overview calls/s and coordinator link", "short", [("GetOverview/s", 'sum(rate(geomesh_status_overview_calls_total{job=~"$status_job"}[5m]))'), ("connected", 'max(geomesh_status_coordinator_connected{job=~"$status_job"})')], "ts"),
    ]),
]


def panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict:
    return {"id": pid, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                        for i, (legend, expr) in enumerate(targets)]}


def job_variable(name: str, default: str) -> dict:
    return {"name": name, "type": "custom", "query": default, "current": {"text": default, "value": default},
            "label": name.replace("_", " "), "hide": 0}


def dashboard() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row in PANELS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets, _kind) in enumerate(row):
            panels.append(panel(pid, title, unit, targets, 12 * (i % 2), y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": "geomesh", "title": "geomesh", "tags": ["geomesh"], "timezone": "browser", "schemaVersion": 39,
        "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"}, "editable": True,
        "description": "geomesh: GeoDNS, the gateway proxy and mesh, the coordinator and etcd, the status page",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus", "hide": 0},
            job_variable("dns_job", "geomesh-dns"), job_variable("gateway_job", "geomesh-gateway"),
            job_variable("coordinator_job", "geomesh-coordinator"), job_variable("status_job", "geomesh-status")]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {OUT}")

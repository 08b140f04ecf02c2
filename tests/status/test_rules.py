"""Table tests of the status page's pure parts: the view (the matrix coloured by handshake age), the event feed, the access rule and the
HTTP request reader (every refusal has its status and a reason naming the rule)."""

from __future__ import annotations

import json
import ssl

import pytest

from geomesh.api import geomesh_pb2 as pb
from status_page import access, http
from status_page.board import Board
from status_page.view import EMPTY, NEVER, age_class, cell_class, events_between, matrix, pair_age, view_of

from .conftest import make_overview


def test_view_names_every_region_and_gateway_and_aggregates_the_matrix_per_region_pair():
    v = view_of(make_overview(3, 4, closed=frozenset({"gw-us-east-1"}), unreachable=frozenset({"gw-eu-central-0"})))
    assert [r.name for r in v.regions] == ["eu-central", "us-east", "ap-northeast"]
    assert len(v.gateways) == 12
    cells = {(c["a"], c["b"]): (c["up"], c["pairs"]) for c in matrix(v)["cells"]}
    assert cells[("eu-central", "eu-central")] == (3, 6)       # one end unreachable: 3 of 4 ok -> 3 pairs of 6
    assert cells[("eu-central", "us-east")] == (9, 16)         # 3 ok x 3 ok of 4 x 4
    assert cells[("ap-northeast", "ap-northeast")] == (6, 6)
    assert len(cells) == 6                                      # each unordered pair once
    assert sum(p for _, p in cells.values()) == v.links_total   # every gateway pair counted once


def test_matrix_of_a_thousand_gateways_is_per_region_pair_not_per_link():
    v = view_of(make_overview(10, 100))
    m = matrix(v)
    assert len(m["cells"]) == 55 and sum(c["pairs"] for c in m["cells"]) == 1000 * 999 // 2


@pytest.mark.parametrize(("change", "kinds"), [
    ({"closed": frozenset({"gw-eu-central-1"})}, {"session", "dns"}),
    ({"unreachable": frozenset({"gw-us-east-0"})}, {"reachability", "dns"}),
    ({"closed": frozenset({"gw-us-east-0", "gw-us-east-1"})}, {"session", "dns", "failover"}),
])
def test_events_name_what_changed(change, kinds):
    before = view_of(make_overview(2, 2))
    after = view_of(make_overview(2, 2, **change))
    events = events_between(before, after, at=1.0)
    assert {e.kind for e in events} == kinds
    assert all(e.at == 1.0 and e.text for e in events)


def _with_cert(serial: str, failures: int = 0, error: str = "") -> pb.Overview:
    o = make_overview(1, 1)
    o.certificates.append(pb.CertificateStatus(name="geo.example.com", serial=serial, not_after=1_900_000_000,
                                               renew_at=1_897_000_000, failures=failures, last_error=error))
    return o


def test_certificates_show_in_the_view_and_their_renewals_and_failures_in_the_feed():
    none, first = view_of(make_overview(1, 1)), view_of(_with_cert("0a"))
    assert first.as_json()["certificates"] == [{"name": "geo.example.com", "serial": "0a", "not_after": 1_900_000_000,
                                                "renew_at": 1_897_000_000, "failures": 0, "last_error": ""}]
    (obtained,) = events_between(none, first, 1.0)
    assert (obtained.kind, obtained.subject) == ("certificate", "geo.example.com")
    assert "obtained" in obtained.text and "2030-03-17" in obtained.text
    (renewed,) = events_between(first, view_of(_with_cert("0b")), 2.0)
    assert "renewed (serial 0b" in renewed.text
    failing = view_of(_with_cert("0b", failures=1, error="ACME directory https://ca/dir: connection refused"))
    (failed,) = events_between(view_of(_with_cert("0b")), failing, 3.0)
    assert failed.text == ("obtaining certificate geo.example.com failed: "
                           "ACME directory https://ca/dir: connection refused")
    # a second failure in a row is not news; nothing changes, nothing is said
    assert events_between(failing, view_of(_with_cert("0b", failures=2, error="again")), 4.0) == []
    assert events_between(first, view_of(_with_cert("0a")), 5.0) == []


def test_events_for_gateways_joining_and_leaving_and_none_from_the_first_overview():
    small, big = view_of(make_overview(2, 1)), view_of(make_overview(2, 2))
    assert events_between(EMPTY, big, 1.0) == []
    joined = events_between(small, big, 1.0)
    assert sorted(e.subject for e in joined if e.kind == "joined") == ["gw-eu-central-1", "gw-us-east-1"]
    left = events_between(big, small, 2.0)
    assert sorted(e.subject for e in left if e.kind == "left") == ["gw-eu-central-1", "gw-us-east-1"]
    recovered = events_between(view_of(make_overview(2, 1, closed=frozenset({"gw-us-east-0"}))), small, 3.0)
    assert [e.kind for e in recovered if e.subject == "us-east"] == ["recovered"]


def test_board_renders_one_document_with_view_events_and_link_state():
    board = Board("c1:7443")
    board.apply(make_overview(2, 2), at=1.0)
    doc = json.loads(board.apply(make_overview(2, 2, closed=frozenset({"gw-us-east-0"})), at=2.0))
    assert doc["connected"] and doc["view"]["revision"] == 7 and doc["events"]
    assert {"matrix", "app_regions", "gateways", "regions"} <= set(doc["view"])
    down = json.loads(board.link(False, "refused", at=3.0))
    assert not down["connected"] and down["events"][-1]["kind"] == "coordinator"


def _der(pki, role: str, name: str) -> bytes:
    ident = pki.identity(role, name)
    return ssl.PEM_cert_to_DER_cert(ident.cert.read_text())


def test_access_rule(pki):
    table = [
        (None, False, True, "loopback", ""),
        (None, True, False, "anonymous", "no client certificate"),
        (_der(pki, "gateway", "gw1"), True, False, "gateway/gw1", "role 'gateway'"),
        (_der(pki, "admin", "ops"), True, True, "admin/ops", ""),
        (_der(pki, "dns", "ns1"), True, True, "dns/ns1", ""),
    ]
    for der, tls, allowed, who, reason in table:
        got = access.decide(der, tls=tls)
        assert (got.allowed, got.who) == (allowed, who)
        assert reason in got.reason and (got.reason == "") == allowed


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"NOT A REQUEST\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 413),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
])
def test_request_reader(raw, status):
    reader = http.RequestReader()
    if status is None:
        req = reader.feed(raw)
        assert req is not None and (req.method, req.path) == ("GET", "/")
        return
    with pytest.raises(http.HttpError) as err:
        for i in range(0, len(raw), 1000):
            reader.feed(raw[i:i + 1000])
    assert err.value.status == status and err.value.reason


@pytest.mark.parametrize(("method", "path", "result"), [
    ("GET", "/", "static"), ("HEAD", "/static/app.js", "static"), ("GET", "/events", "events"),
    ("GET", "/api/state", "state"), ("GET", "/nope", 404), ("POST", "/", 405), ("DELETE", "/events", 405),
])
def test_routes(method, path, result):
    request = http.Request(method, path, {})
    if isinstance(result, str):
        assert http.route(request) == result
    else:
        with pytest.raises(http.HttpError) as err:
            http.route(request)
        assert err.value.status == result


def test_overview_session_names():
    v = view_of(pb.Overview(gateways=[pb.GatewayHealth(name="g", region="r", session=pb.SESSION_STATE_TIMED_OUT,
                                                       reachable=True)]))
    assert v.gateways[0].session == "timed_out" and v.gateways[0].link_ok
    assert v.region_names() == ["r"]


@pytest.mark.parametrize(("age", "cls"), [
    (None, "none"), (0.5, "ok"), (135.0, "ok"), (135.1, "warn"), (180.0, "warn"), (180.5, "bad"), (NEVER, "bad"),
])
def test_age_class(age, cls):
    assert age_class(age) == cls


@pytest.mark.parametrize(("up", "pairs", "worst", "cls"), [
    (4, 4, None, "ok"), (2, 4, None, "warn"), (0, 4, None, "bad"), (0, 0, None, "none"),
    (4, 4, 30.0, "ok"), (4, 4, 150.0, "warn"), (4, 4, NEVER, "bad"),
    (2, 4, 30.0, "ok"),  # a reported age wins over the coordinator's share of links up
    (0, 0, 30.0, "none"),
])
def test_cell_class(up, pairs, worst, cls):
    assert cell_class(up, pairs, worst) == cls


def _with_handshakes(overview: pb.Overview, reports: dict[str, dict[str, float]]) -> pb.Overview:
    for g in overview.gateways:
        g.peers.extend(pb.PeerHandshake(name=p, age_seconds=a) for p, a in reports.get(g.name, {}).items())
    return overview


@pytest.mark.parametrize(("reports", "cells"), [
    # nothing reported: by links up (all up)
    ({}, {("eu-central", "us-east"): (None, "ok"), ("eu-central", "eu-central"): (None, "ok")}),
    # fresh on one side: green; the region pair with no report stays by links up
    ({"gw-eu-central-0": {"gw-us-east-0": 20.0, "gw-us-east-1": 40.0}},
     {("eu-central", "us-east"): (40.0, "ok"), ("us-east", "us-east"): (None, "ok")}),
    # the worse end of a pair counts: gw-us-east-1 saw its handshake with gw-eu-central-0 150 s ago
    ({"gw-eu-central-0": {"gw-us-east-1": 20.0}, "gw-us-east-1": {"gw-eu-central-0": 150.0}},
     {("eu-central", "us-east"): (150.0, "warn")}),
    # one pair that never shook hands turns the cell red; inside a region too
    ({"gw-eu-central-0": {"gw-us-east-0": 20.0, "gw-us-east-1": 0.0, "gw-eu-central-1": 200.0}},
     {("eu-central", "us-east"): ("never", "bad"), ("eu-central", "eu-central"): (200.0, "bad")}),
    # a report about an unknown gateway or itself is left out
    ({"gw-eu-central-0": {"ghost": 0.0, "gw-eu-central-0": 0.0}}, {("eu-central", "eu-central"): (None, "ok")}),
])
def test_matrix_is_coloured_by_the_worst_handshake_age_of_each_region_pair(reports, cells):
    m = matrix(view_of(_with_handshakes(make_overview(2, 2), reports)))
    got = {(c["a"], c["b"]): (c["worst_age"], c["class"]) for c in m["cells"]}
    for key, want in cells.items():
        assert got[key] == want, key


def test_pair_age_and_the_gateway_json_carry_load_version_and_handshakes():
    ov = _with_handshakes(make_overview(1, 3), {"gw-eu-central-0": {"gw-eu-central-1": 12.0, "gw-eu-central-2": 0.0}})
    ov.gateways[0].load, ov.gateways[0].active_connections, ov.gateways[0].version = 0.25, 9, "0.1.0"
    v = view_of(ov)
    a, b, c = (v.gateway(f"gw-eu-central-{i}") for i in range(3))
    assert (pair_age(a, b), pair_age(b, a), pair_age(a, c), pair_age(b, c)) == (12.0, 12.0, NEVER, None)
    doc = json.loads(json.dumps(v.as_json(), allow_nan=False))  # JSON-safe: never is null, not Infinity
    g0 = doc["gateways"][0]
    assert (g0["load"], g0["active_connections"], g0["version"]) == (0.25, 9, "0.1.0")
    assert g0["handshakes"] == {"gw-eu-central-1": 12.0, "gw-eu-central-2": None}
    assert doc["gateways"][1]["handshakes"] == {}

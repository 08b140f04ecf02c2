"""Table tests of `mesh_intake.plan_connection`: which protocol serves a connection, from the name
asked for, the ALPN offered, `g_mode` and where the connection came from."""

from __future__ import annotations

import pytest

from regional_gateway.proxy.hostnames import Mode, NameMatch, UnknownName
from regional_gateway.proxy.mesh_intake import AsH2, AsHttp1, AsTunnel, Origin, Refused, plan_connection

HTTP = NameMatch("shop", 8080, Mode.HTTP)
PASS = NameMatch("shop", 8443, Mode.PASSTHROUGH)
G = NameMatch("shop", 50051, Mode.H2)
UNKNOWN = UnknownName("no app 'nope'")


@pytest.mark.parametrize("match,alpn,g_mode,origin,want", [
    # the public TLS listener
    (PASS, (), "streams", Origin.TLS, AsTunnel(raw_tls=True, may_forward=True)),
    (PASS, ("h2",), "tunnel", Origin.TLS, AsTunnel(raw_tls=True, may_forward=True)),
    (G, ("h2", "http/1.1"), "streams", Origin.TLS, AsH2(may_forward=True)),
    (G, ("h2",), "tunnel", Origin.TLS, AsTunnel(raw_tls=False, may_forward=True, authority="shop-50051g.z")),
    (G, ("http/1.1",), "streams", Origin.TLS, AsHttp1()),  # gets the 421 naming ALPN h2
    (G, (), "tunnel", Origin.TLS, AsHttp1()),
    (HTTP, ("h2",), "streams", Origin.TLS, AsHttp1()),
    (UNKNOWN, (), "streams", Origin.TLS, AsHttp1()),  # answered 404 in HTTP, once terminated
    (None, (), "streams", Origin.TLS, AsHttp1()),  # no SNI
    # forwarded by another gateway over the mesh: never a second hop
    (PASS, (), "streams", Origin.MESH_PASSTHROUGH, AsTunnel(raw_tls=True, may_forward=False)),
    (HTTP, (), "streams", Origin.MESH_PASSTHROUGH, Refused("bad-forwarded-passthrough",
                                                           "'shop-50051g.z' is not a TLS passthrough name here")),
    (G, (), "streams", Origin.MESH_H2, AsH2(may_forward=False)),
    (G, (), "tunnel", Origin.MESH_H2, AsTunnel(raw_tls=False, may_forward=False)),
    (PASS, (), "streams", Origin.MESH_H2, Refused("bad-forwarded-h2", "'shop-50051g.z' is not a `g` name")),
    (UNKNOWN, (), "streams", Origin.MESH_H2, Refused("bad-forwarded-h2", "no app 'nope'")),
    (None, (), "streams", Origin.MESH_H2, Refused("bad-forwarded-h2", "'shop-50051g.z' is not a `g` name")),
])
def test_plan_connection(match, alpn, g_mode, origin, want):
    assert plan_connection(match, alpn, g_mode, origin, "shop-50051g.z") == want

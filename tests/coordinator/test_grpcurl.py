"""Plain grpcurl (the real binary, installed by the project) over mTLS with reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def grpcurl_binary() -> str:
    venv_bin = Path(sys.executable).parent / "grpcurl"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl is not installed: run scripts/install.sh (./run test does)")
    return found


def grpcurl(coordinator, *words: str, data: str | None = None) -> str:
    """grpcurl [tls flags] [-d data] ADDRESS words..."""
    ident = coordinator.pki.identity("admin", "grpcurl")
    cmd = [grpcurl_binary(), "-cacert", str(ident.ca), "-cert", str(ident.cert), "-key", str(ident.key),
           "-servername", "geomesh-coordinator", "-max-time", "20", *(["-d", data] if data else []),
           coordinator.address, *words]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_grpcurl_lists_describes_creates_and_reads(coordinator):
    services = grpcurl(coordinator, "list").split()
    assert {"geomesh.v1.Admin", "geomesh.v1.GatewayControl", "geomesh.v1.RoutingFeed",
            "grpc.health.v1.Health"} <= set(services)
    described = grpcurl(coordinator, "describe", "geomesh.v1.Admin")
    for method in ("CreateRegion", "ListGateways", "DrainGateway", "AddDomain", "GetOverview"):
        assert f"rpc {method}" in described
    created = json.loads(grpcurl(coordinator, "geomesh.v1.Admin/CreateRegion",
                                 data='{"name":"eu-central","latitude":50.11,"longitude":8.68}'))
    assert created["name"] == "eu-central"
    read = json.loads(grpcurl(coordinator, "geomesh.v1.Admin/GetRegion", data='{"name":"eu-central"}'))
    assert read == {"name": "eu-central", "latitude": 50.11, "longitude": 8.68}
    health = json.loads(grpcurl(coordinator, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


def test_grpcurl_invalid_argument_names_the_field(coordinator):
    ident = coordinator.pki.identity("admin", "grpcurl")
    out = subprocess.run([grpcurl_binary(), "-cacert", str(ident.ca), "-cert", str(ident.cert), "-key", str(ident.key),
                          "-servername", "geomesh-coordinator", "-d", '{"name":"eu","latitude":123}',
                          coordinator.address, "geomesh.v1.Admin/CreateRegion"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr and "latitude" in out.stderr

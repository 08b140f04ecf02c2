"""The coordinator's Prometheus endpoint reports requests by method and code, and etcd round trips."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.processes import free_port


async def test_metrics_count_requests_by_method_and_code(coordinator_factory):
    port = free_port()
    c = coordinator_factory("--metrics-port", str(port))
    admin = c.admin()
    await admin.CreateRegion(pb.Region(name="eu-central", latitude=50.1, longitude=8.7))
    with pytest.raises(grpc.aio.AioRpcError):
        await admin.CreateRegion(pb.Region(name="eu-central", latitude=50.1, longitude=8.7))
    with pytest.raises(grpc.aio.AioRpcError):
        await admin.CreateRegion(pb.Region(name="x", latitude=500, longitude=8.7))
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'geomesh_coordinator_requests_total{code="OK",method="CreateRegion"} 1.0' in text
    assert 'geomesh_coordinator_requests_total{code="ALREADY_EXISTS",method="CreateRegion"} 1.0' in text
    assert 'geomesh_coordinator_requests_total{code="INVALID_ARGUMENT",method="CreateRegion"} 1.0' in text
    assert 'geomesh_etcd_request_seconds_count{op="txn"}' in text
    assert "geomesh_coordinator_etcd_connected 1.0" in text
    assert "geomesh_coordinator_watch_lag_seconds_count" in text

"""GatewayControl/RequestCertificate's refusals that need no CA, against a real coordinator on real
etcd: only a gateway identity may ask, a bad name is INVALID_ARGUMENT naming `name`, and a
coordinator without ACME or without a resolver says which flag is missing. (Orders, the TXT
check, rate limits: tests/certs/test_on_demand_certificates.py.)"""

from __future__ import annotations

import grpc
import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg


async def refused(stub, name: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RequestCertificate(pb.CertificateRequest(name=name))
    return err.value


async def test_refusals_name_the_field_or_the_missing_flag(coordinator) -> None:
    gw = coordinator.gateway_control("gw-a")
    for bad in ("", "localhost", "*.shop.example", "a..b.example", "x" * 300 + ".example"):
        err = await refused(gw, bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("name:"), bad
    err = await refused(gw, "shop.example")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "without --acme-directory" in err.details()
    # an admin (or any other role) does not ask for certificates
    admin = pbg.GatewayControlStub(coordinator.channel(coordinator.pki.identity("admin", "root")))
    err = await refused(admin, "shop.example")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

"""A gateway's sealing key at Register (real coordinator): a key of the wrong length or the
all-zero key is refused with INVALID_ARGUMENT naming `sealing_public_key`; a good one is kept on
the record (base64) and shown by GetGateway; none at all is allowed (an older gateway)."""

from __future__ import annotations

import base64
import os

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from geomesh.api import geomesh_pb2 as pb
from geomesh.sealing import public_bytes

from ..coordinator.test_admin import seed

WG_KEY = base64.b64encode(os.urandom(32)).decode()


def _request(key: bytes) -> pb.RegisterRequest:
    return pb.RegisterRequest(name="gw-seal", region="eu-central", public_ip="192.0.2.61", wg_port=51820,
                              wg_public_key=WG_KEY, proxy_port=8080,
                              sealing_public_key=key)


async def test_register_checks_and_keeps_the_sealing_key(coordinator) -> None:
    admin = coordinator.admin()
    await seed(admin)
    await coordinator.enroll("gw-seal", "eu-central", "192.0.2.61")
    control = coordinator.gateway_control("gw-seal")
    for bad in (b"k" * 31, b"k" * 33, bytes(32)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control.Register(_request(bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sealing_public_key" in (refused.value.details() or "")

    resp = await control.Register(_request(b""))  # an older gateway: registers, takes no certificates
    assert resp.gateway.sealing_public_key == ""

    key = public_bytes(X25519PrivateKey.generate())
    resp = await control.Register(_request(key))
    assert base64.b64decode(resp.gateway.sealing_public_key) == key
    got = await admin.GetGateway(pb.GetRequest(name="gw-seal"))
    assert base64.b64decode(got.sealing_public_key) == key

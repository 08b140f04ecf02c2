"""The gateway's side of `GatewayControl/RequestCertificate`: asking the coordinator for a certificate.

The TLS listener's certificates on demand (`proxy.on_demand`) ask through this, over the agent's
channel to its current coordinator (a channel of its own per request: they are rare, one per
custom domain's first handshake, and must not wait behind the session stream). The answer
becomes an `on_demand.Answer`: accepted with the coordinator's word (`held`, `pending`,
`ordered`), or refused with the status code and its details (`FAILED_PRECONDITION: no order
without a matching TXT record: ...`); a coordinator that cannot be reached or does not answer in
time is an `error`.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from regional_gateway.proxy.on_demand import Answer

UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


async def request_certificate(channel: Callable[[], grpc.aio.Channel], metadata: tuple, name: str,
                              timeout: float) -> Answer:
    """Ask the coordinator `channel()` reaches for a certificate for `name`."""
    try:
        async with channel() as ch:
            resp = await pbg.GatewayControlStub(ch).RequestCertificate(
                pb.CertificateRequest(name=name), timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return Answer(False, f"{exc.code().name}: {exc.details()}", error=exc.code() in UNREACHABLE)
    return Answer(resp.accepted, resp.reason or ("accepted" if resp.accepted else "refused"))

"""The gRPC servicers, added to a server in one place.

Thin: convert protobuf to domain values (validation happens there), authorise the caller, call
`Operations` for writes or read the cache's immutable `Snapshot`, convert back. Streams use only
the fan-out interface (`coordinator.fanout.Fanout`). One module per service:
`coordinator.admin_service` (Admin), `coordinator.routing_feed` (RoutingFeed's Watch) and
`coordinator.gateway_session` (GatewayControl: registration and the gateway's session, its
liveness and heartbeats); what they share is in `coordinator.servicer_common`.
"""

from __future__ import annotations

import grpc

from coordinator.admin_service import AdminService
from coordinator.gateway_session import GatewayControlService
from coordinator.routing_feed import RoutingFeedService
from coordinator.rpc_common import add_service
from coordinator.servicer_common import wire
from geomesh.api import geomesh_pb2 as pb

__all__ = ["AdminService", "GatewayControlService", "RoutingFeedService", "add_services", "wire"]


def add_services(server: grpc.aio.Server, admin: AdminService, feed: RoutingFeedService,
                 control: GatewayControlService) -> None:
    """The three services, with requests decoded by `rpc_common.add_service` (a malformed body
    is INVALID_ARGUMENT) and `wire` as Watch's serializer."""
    services = pb.DESCRIPTOR.services_by_name
    add_service(server, admin, services["Admin"], pb)
    add_service(server, feed, services["RoutingFeed"], pb, {"Watch": wire})
    add_service(server, control, services["GatewayControl"], pb)

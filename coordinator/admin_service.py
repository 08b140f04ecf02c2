"""The Admin servicer: regions, apps, instances, domains, gateways, enrollment and revocation.

Thin: convert protobuf to domain values (validation happens there), authorise the caller (the
`admin` role, by `rpc_common.unary`), call `Operations` for writes or read the cache's immutable
`Snapshot` through the fan-out, convert back. Write calls are audit lines (`coordinator.audit`).
`GetOverview` is the pure `views.overview` of the current snapshot, with what the gateways whose
sessions this replica holds reported (load, connections, version, handshake ages: `stats`, shared
with the GatewayControl servicer; in memory, so each replica shows its own sessions'). Revoking an identity ends its
open streams (`coordinator.access`); revoking the calling identity itself is refused.
"""

from __future__ import annotations

import asyncio
import logging

from coordinator.access import Access
from coordinator.enrollment import Enrollment
from coordinator.fanout import Fanout
from coordinator.heartbeats import GatewayStats
from coordinator.operations import Operations
from coordinator.revocation import Revocation, already, revoke_txn
from coordinator.rpc_common import Caller, unary
from coordinator.servicer_common import ServicerBase, checked_name
from coordinator.views import overview
from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.errors import NotFoundError, PreconditionError, ValidationError
from geomesh.model import App, Domain, GatewayState, Instance, Region

log = logging.getLogger("geomesh.coordinator")


class AdminService(ServicerBase, pbg.AdminServicer):
    def __init__(self, feed: Fanout, ops: Operations, access: Access, *, stats: GatewayStats | None = None) -> None:
        super().__init__(feed, ops, access)
        self.stats = stats if stats is not None else GatewayStats()

    # regions
    @unary("admin", write=True)
    async def CreateRegion(self, request: pb.Region, context, caller: Caller) -> pb.Region:
        return (await self.ops.create_region(Region.from_proto(request))).to_proto()

    @unary("admin")
    async def GetRegion(self, request: pb.GetRequest, context, caller: Caller) -> pb.Region:
        region = self.feed.snapshot().regions.get(checked_name("name", request.name))
        if region is None:
            raise NotFoundError(f"region {request.name!r} does not exist")
        return region.to_proto()

    @unary("admin")
    async def ListRegions(self, request: pb.Empty, context, caller: Caller) -> pb.ListRegionsResponse:
        regions = self.feed.snapshot().regions
        return pb.ListRegionsResponse(regions=[regions[n].to_proto() for n in sorted(regions)])

    @unary("admin", write=True)
    async def DeleteRegion(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.delete_region(checked_name("name", request.name))
        return pb.Empty()

    # apps
    @unary("admin", write=True)
    async def CreateApp(self, request: pb.App, context, caller: Caller) -> pb.App:
        return (await self.ops.create_app(App.from_proto(request))).to_proto()

    @unary("admin", write=True)
    async def UpdateApp(self, request: pb.UpdateAppRequest, context, caller: Caller) -> pb.App:
        if not request.HasField("app"):
            raise ValidationError("app", "is required")
        if request.expected_revision < 0:
            raise ValidationError("expected_revision", "must be >= 0")
        try:
            app = App.from_proto(request.app)
        except ValidationError as exc:
            raise ValidationError(f"app.{exc.field}", exc.message) from None
        return (await self.ops.update_app(app, request.expected_revision)).to_proto()

    @unary("admin")
    async def GetApp(self, request: pb.GetRequest, context, caller: Caller) -> pb.App:
        app = self.feed.snapshot().apps.get(checked_name("name", request.name))
        if app is None:
            raise NotFoundError(f"app {request.name!r} does not exist")
        return app.to_proto()

    @unary("admin")
    async def ListApps(self, request: pb.Empty, context, caller: Caller) -> pb.ListAppsResponse:
        apps = self.feed.snapshot().apps
        return pb.ListAppsResponse(apps=[apps[n].to_proto() for n in sorted(apps)])

    @unary("admin", write=True)
    async def DeleteApp(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.delete_app(checked_name("name", request.name))
        return pb.Empty()

    # instances
    @unary("admin", write=True)
    async def AddInstance(self, request: pb.Instance, context, caller: Caller) -> pb.Instance:
        return (await self.ops.add_instance(Instance.from_proto(request))).to_proto()

    @unary("admin", write=True)
    async def RemoveInstance(self, request: pb.InstanceRef, context, caller: Caller) -> pb.Empty:
        await self.ops.remove_instance(checked_name("app", request.app), checked_name("id", request.id))
        return pb.Empty()

    @unary("admin")
    async def ListInstances(self, request: pb.ListInstancesRequest, context, caller: Caller) -> pb.ListInstancesResponse:
        if request.app:
            checked_name("app", request.app)
        if request.region:
            checked_name("region", request.region)
        items = [i for _, i in sorted(self.feed.snapshot().instances.items())
                 if (not request.app or i.app == request.app) and (not request.region or i.region == request.region)]
        return pb.ListInstancesResponse(instances=[i.to_proto() for i in items])

    # domains
    @unary("admin", write=True)
    async def AddDomain(self, request: pb.Domain, context, caller: Caller) -> pb.Domain:
        return (await self.ops.add_domain(Domain.from_proto(request))).to_proto()

    @unary("admin", write=True)
    async def RemoveDomain(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.remove_domain(validate.fqdn("name", request.name))
        return pb.Empty()

    @unary("admin")
    async def ListDomains(self, request: pb.Empty, context, caller: Caller) -> pb.ListDomainsResponse:
        domains = self.feed.snapshot().domains
        return pb.ListDomainsResponse(domains=[domains[n].to_proto() for n in sorted(domains)])

    # gateways
    @unary("admin")
    async def ListGateways(self, request: pb.ListGatewaysRequest, context, caller: Caller) -> pb.ListGatewaysResponse:
        if request.region:
            checked_name("region", request.region)
        snap = self.feed.snapshot()
        gws = [snap.gateway(n) for n in sorted(snap.gateways)]
        return pb.ListGatewaysResponse(gateways=[g.to_proto() for g in gws
                                                 if g and (not request.region or g.region == request.region)])

    @unary("admin")
    async def GetGateway(self, request: pb.GetRequest, context, caller: Caller) -> pb.Gateway:
        gw = self.feed.snapshot().gateway(checked_name("name", request.name))
        if gw is None:
            raise NotFoundError(f"gateway {request.name!r} does not exist")
        return gw.to_proto()

    @unary("admin", write=True)
    async def DrainGateway(self, request: pb.GetRequest, context, caller: Caller) -> pb.Gateway:
        return (await self.ops.set_gateway_state(checked_name("name", request.name), GatewayState.DRAINING)).to_proto()

    @unary("admin", write=True)
    async def ActivateGateway(self, request: pb.GetRequest, context, caller: Caller) -> pb.Gateway:
        return (await self.ops.set_gateway_state(checked_name("name", request.name), GatewayState.ACTIVE)).to_proto()

    @unary("admin", write=True)
    async def RemoveGateway(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.remove_gateway(checked_name("name", request.name))
        return pb.Empty()

    @unary("admin")
    async def GetOverview(self, request: pb.Empty, context, caller: Caller) -> pb.Overview:
        return overview(self.feed.snapshot(), self.stats, asyncio.get_running_loop().time())

    # enrollment
    @unary("admin", write=True)
    async def EnrollGateway(self, request: pb.Enrollment, context, caller: Caller) -> pb.EnrollGatewayResponse:
        enrollment, removed = await self.enrollment_ops.enroll(Enrollment.from_proto(request))
        if removed:
            log.warning("gateway record removed: it does not fit its new enrollment",
                        extra={"fields": {"gateway": enrollment.name, "region": enrollment.region}})
        return pb.EnrollGatewayResponse(enrollment=enrollment.to_proto(), record_removed=removed)

    @unary("admin", write=True)
    async def UnenrollGateway(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.enrollment_ops.unenroll(checked_name("name", request.name))
        return pb.Empty()

    @unary("admin")
    async def ListEnrollments(self, request: pb.Empty, context, caller: Caller) -> pb.ListEnrollmentsResponse:
        items = self.access.enrollments.all()
        return pb.ListEnrollmentsResponse(enrollments=[items[n].to_proto() for n in sorted(items)])

    # revocation
    @unary("admin", write=True)
    async def RevokeIdentity(self, request: pb.RevokeIdentityRequest, context, caller: Caller) -> pb.Revocation:
        revocation = Revocation.from_request(request, revoked_by=f"{caller.role}/{caller.name}")
        if revocation.covers(caller.role, caller.name, caller.serial):
            raise PreconditionError("that would revoke the calling identity itself: use another admin identity")
        ok, rev = await self.ops._commit(revoke_txn(revocation))
        if not ok:
            raise already(revocation)
        log.warning("identity revoked", extra={"fields": {"serial": revocation.serial, "role": revocation.role,
                                                          "name": revocation.name, "by": revocation.revoked_by}})
        return revocation.to_proto()

    @unary("admin")
    async def ListRevocations(self, request: pb.Empty, context, caller: Caller) -> pb.ListRevocationsResponse:
        return pb.ListRevocationsResponse(revocations=[r.to_proto() for r in self.access.revocations.all()])

"""The gRPC servicers: Admin, GatewayControl and RoutingFeed.

Thin: convert protobuf to domain values (validation happens there), authorise the caller, call
`Operations` for writes or read the `State` cache, convert back. Streams wait on the state's
change signal and send what changed since the revision the client has (see `State.changes_since`).
The gateway session also owns the gateway's liveness: while the stream is open `alive/<g>` exists,
bound to this replica's lease; when the stream closes the key is deleted at once (only if it is
still ours: a gateway that moved to another replica keeps the key that replica wrote). If the
replica dies or loses etcd, its one lease expires and etcd deletes all its gateways' keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from prometheus_client import Counter, Gauge

from coordinator.operations import Operations
from coordinator.rpc_common import Caller, stream, unary
from coordinator.state import State
from coordinator.state import key as state_key
from coordinator.store import EtcdStore, ReplicaLease
from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.errors import (
    NotFoundError,
    PermissionDeniedError,
    StoreUnavailableError,
    UnauthenticatedError,
    ValidationError,
)
from geomesh.model import App, Domain, Gateway, GatewayState, Instance, Region

log = logging.getLogger("geomesh.coordinator")

SESSIONS = Gauge("geomesh_coordinator_sessions", "open streams", ["kind"])
SENT = Counter("geomesh_coordinator_stream_messages_total", "messages sent on streams", ["kind", "type"])
SENT_BYTES = Counter("geomesh_coordinator_stream_bytes_total", "bytes sent on streams", ["kind"])


def _name(field: str, value: str) -> str:
    return validate.dns_label(field, value)


class _Base:
    def __init__(self, state: State, ops: Operations, *, insecure: bool) -> None:
        self.state = state
        self.ops = ops
        self.insecure = insecure


class AdminService(_Base, pbg.AdminServicer):
    # regions
    @unary("admin")
    async def CreateRegion(self, request: pb.Region, context, caller: Caller) -> pb.Region:
        return (await self.ops.create_region(Region.from_proto(request))).to_proto()

    @unary("admin")
    async def GetRegion(self, request: pb.GetRequest, context, caller: Caller) -> pb.Region:
        region = self.state.regions.get(_name("name", request.name))
        if region is None:
            raise NotFoundError(f"region {request.name!r} does not exist")
        return region.to_proto()

    @unary("admin")
    async def ListRegions(self, request: pb.Empty, context, caller: Caller) -> pb.ListRegionsResponse:
        return pb.ListRegionsResponse(regions=[self.state.regions[n].to_proto() for n in sorted(self.state.regions)])

    @unary("admin")
    async def DeleteRegion(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.delete_region(_name("name", request.name))
        return pb.Empty()

    # apps
    @unary("admin")
    async def CreateApp(self, request: pb.App, context, caller: Caller) -> pb.App:
        return (await self.ops.create_app(App.from_proto(request))).to_proto()

    @unary("admin")
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
        app = self.state.apps.get(_name("name", request.name))
        if app is None:
            raise NotFoundError(f"app {request.name!r} does not exist")
        return app.to_proto()

    @unary("admin")
    async def ListApps(self, request: pb.Empty, context, caller: Caller) -> pb.ListAppsResponse:
        return pb.ListAppsResponse(apps=[self.state.apps[n].to_proto() for n in sorted(self.state.apps)])

    @unary("admin")
    async def DeleteApp(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.delete_app(_name("name", request.name))
        return pb.Empty()

    # instances
    @unary("admin")
    async def AddInstance(self, request: pb.Instance, context, caller: Caller) -> pb.Instance:
        return (await self.ops.add_instance(Instance.from_proto(request))).to_proto()

    @unary("admin")
    async def RemoveInstance(self, request: pb.InstanceRef, context, caller: Caller) -> pb.Empty:
        await self.ops.remove_instance(_name("app", request.app), _name("id", request.id))
        return pb.Empty()

    @unary("admin")
    async def ListInstances(self, request: pb.ListInstancesRequest, context, caller: Caller) -> pb.ListInstancesResponse:
        if request.app:
            _name("app", request.app)
        if request.region:
            _name("region", request.region)
        items = [i for _, i in sorted(self.state.instances.items())
                 if (not request.app or i.app == request.app) and (not request.region or i.region == request.region)]
        return pb.ListInstancesResponse(instances=[i.to_proto() for i in items])

    # domains
    @unary("admin")
    async def AddDomain(self, request: pb.Domain, context, caller: Caller) -> pb.Domain:
        return (await self.ops.add_domain(Domain.from_proto(request))).to_proto()

    @unary("admin")
    async def RemoveDomain(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.remove_domain(validate.fqdn("name", request.name))
        return pb.Empty()

    @unary("admin")
    async def ListDomains(self, request: pb.Empty, context, caller: Caller) -> pb.ListDomainsResponse:
        return pb.ListDomainsResponse(domains=[self.state.domains[n].to_proto() for n in sorted(self.state.domains)])

    # gateways
    @unary("admin")
    async def ListGateways(self, request: pb.ListGatewaysRequest, context, caller: Caller) -> pb.ListGatewaysResponse:
        if request.region:
            _name("region", request.region)
        gws = [self.state.gateway(n) for n in sorted(self.state.gateways)]
        return pb.ListGatewaysResponse(gateways=[g.to_proto() for g in gws
                                                 if g and (not request.region or g.region == request.region)])

    @unary("admin")
    async def GetGateway(self, request: pb.GetRequest, context, caller: Caller) -> pb.Gateway:
        gw = self.state.gateway(_name("name", request.name))
        if gw is None:
            raise NotFoundError(f"gateway {request.name!r} does not exist")
        return gw.to_proto()

    @unary("admin")
    async def DrainGateway(self, request: pb.GetRequest, context, caller: Caller) -> pb.Gateway:
        return (await self.ops.set_gateway_state(_name("name", request.name), GatewayState.DRAINING)).to_proto()

    @unary("admin")
    async def ActivateGateway(self, request: pb.GetRequest, context, caller: Caller) -> pb.Gateway:
        return (await self.ops.set_gateway_state(_name("name", request.name), GatewayState.ACTIVE)).to_proto()

    @unary("admin")
    async def RemoveGateway(self, request: pb.DeleteRequest, context, caller: Caller) -> pb.Empty:
        await self.ops.remove_gateway(_name("name", request.name))
        return pb.Empty()

    @unary("admin")
    async def GetOverview(self, request: pb.Empty, context, caller: Caller) -> pb.Overview:
        return self.state.overview()


class RoutingFeedService(_Base, pbg.RoutingFeedServicer):
    @stream("dns", "gateway", "admin")
    async def Watch(self, request: pb.WatchRoutingRequest, context, caller: Caller):
        if request.last_revision < 0:
            raise ValidationError("last_revision", "must be >= 0")
        SESSIONS.labels("routing").inc()
        try:
            have = request.last_revision if request.last_revision > 0 else -1
            while True:
                delta = self.state.changes_since(have)
                update = self.state.routing_update(delta)
                if update.snapshot or update.upserts or update.removals:
                    SENT.labels("routing", "snapshot" if update.snapshot else "delta").inc()
                    SENT_BYTES.labels("routing").inc(update.ByteSize())
                    yield update
                have = delta.revision
                if self.state.revision <= have:
                    await asyncio.shield(self.state.changed())
        finally:
            SESSIONS.labels("routing").dec()


class GatewayControlService(_Base, pbg.GatewayControlServicer):
    def __init__(self, state: State, ops: Operations, store: EtcdStore, lease: ReplicaLease, *,
                 insecure: bool, lease_ttl: int, mesh_cidr: str) -> None:
        super().__init__(state, ops, insecure=insecure)
        self.store = store
        self.lease = lease
        self.lease_ttl = lease_ttl
        self._cleanups: set[asyncio.Task] = set()
        self.mesh_cidr = mesh_cidr

    @unary("gateway")
    async def Register(self, request: pb.RegisterRequest, context, caller: Caller) -> pb.RegisterResponse:
        _name("name", request.name)
        caller.require_gateway(request.name)
        gw = Gateway(name=request.name, region=request.region, public_ip=request.public_ip,
                     public_ipv6=request.public_ipv6, wg_port=request.wg_port,
                     wg_public_key=request.wg_public_key, mesh_ip="", proxy_port=request.proxy_port)
        registered = await self.ops.register_gateway(gw)
        log.info("gateway registered", extra={"fields": {"gateway": gw.name, "mesh_ip": registered.mesh_ip}})
        return pb.RegisterResponse(gateway=registered.to_proto(), mesh_cidr=self.mesh_cidr)

    def _own_instance(self, caller: Caller, region: str, what: str) -> None:
        gw = self.state.gateways.get(caller.name)
        if gw is None:
            raise PermissionDeniedError(f"gateway {caller.name!r} is not registered")
        if region != gw.region:
            raise PermissionDeniedError(f"gateway {caller.name!r} (region {gw.region}) may not change {what} in region {region!r}")

    @unary("gateway")
    async def RegisterInstance(self, request: pb.Instance, context, caller: Caller) -> pb.Instance:
        inst = Instance.from_proto(request)
        self._own_instance(caller, inst.region, f"instance {inst.key!r}")
        return (await self.ops.add_instance(inst)).to_proto()

    @unary("gateway")
    async def DeregisterInstance(self, request: pb.InstanceRef, context, caller: Caller) -> pb.Empty:
        name = f"{_name('app', request.app)}/{_name('id', request.id)}"
        inst = self.state.instances.get(name)
        if inst is None:
            raise NotFoundError(f"instance {name!r} does not exist")
        self._own_instance(caller, inst.region, f"instance {name!r}")
        await self.ops.remove_instance(request.app, request.id)
        return pb.Empty()

    @stream("gateway")
    async def Session(self, request_iterator, context, caller: Caller):
        first = await _next_or_none(request_iterator, timeout=self.lease_ttl * 2)
        if first is None or first.WhichOneof("msg") != "hello":
            raise ValidationError("hello", "the first message of a session must be a hello")
        hello = first.hello
        _name("hello.name", hello.name)
        caller.require_gateway(hello.name, "the session of gateway")
        if caller.role != "gateway":
            raise UnauthenticatedError("sessions are for gateway identities")
        if hello.name not in self.state.gateways:
            # registered a moment ago (maybe through another replica) but not yet in our cache?
            stored = await self.ops.store.get(state_key("gateways", hello.name))
            if stored is None:
                raise NotFoundError(f"gateway {hello.name!r} is not registered: call Register first")
            await self.state.wait_change(stored.mod_revision - 1, timeout=10)
        name = hello.name
        alive_rev = await self._mark_alive(name)
        SESSIONS.labels("gateway").inc()
        log.info("gateway session open", extra={"fields": {"gateway": name}})
        reader = asyncio.create_task(self._read_heartbeats(name, request_iterator))
        try:
            have = hello.last_revision if hello.last_revision > 0 else -1
            while True:
                delta = self.state.changes_since(have)
                # memoised per revision range (and region): N sessions share one computation
                mesh = self.state.mesh_update(delta, name, since=have)
                routing = self.state.routing_update(delta, since=have)
                msg = pb.SessionDown(revision=delta.revision)
                if mesh.snapshot or mesh.upserts or mesh.removals:
                    msg.mesh.CopyFrom(mesh)
                if routing.snapshot or routing.upserts or routing.removals:
                    msg.routing.CopyFrom(routing)
                if msg.HasField("mesh") or msg.HasField("routing"):
                    SENT.labels("gateway", "snapshot" if delta.routing is None else "delta").inc()
                    SENT_BYTES.labels("gateway").inc(msg.ByteSize())
                    yield msg
                have = delta.revision
                if self.state.revision > have:
                    continue
                lost = self.lease.lost
                # shared futures: waiting costs no task per session
                done, _ = await asyncio.wait({self.state.changed(), reader, lost}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    reader.result()  # raises if the gateway misbehaved
                    return  # the gateway closed its side
                if lost.done():
                    # etcd expired this replica's lease (unreachable for longer than the TTL) while
                    # the gateway is still connected: mark it alive again under the new lease
                    log.warning("replica lease expired while connected: renewing", extra={"fields": {"gateway": name}})
                    alive_rev = await self._mark_alive(name)
        finally:
            reader.cancel()
            SESSIONS.labels("gateway").dec()
            # grpc cancels this handler when the gateway goes away, and may cancel it again while
            # it cleans up: the cleanup runs as its own task so a second cancel cannot abort it
            cleanup = asyncio.create_task(self._end_session(name, alive_rev))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)

    async def _end_session(self, name: str, alive_rev: int) -> None:
        try:
            await self.ops.clear_alive(name, alive_rev)
        except StoreUnavailableError:
            log.warning("could not clear alive; the replica lease will expire", extra={"fields": {"gateway": name}})
        log.info("gateway session closed", extra={"fields": {"gateway": name}})

    async def _mark_alive(self, name: str) -> int:
        lease_id = await self.lease.ensure()
        return await self.ops.mark_alive(name, lease_id)

    async def _read_heartbeats(self, name: str, request_iterator) -> None:
        """Consume heartbeats; return when the gateway closes or goes silent for a lease TTL."""
        while True:
            msg = await _next_or_none(request_iterator, timeout=self.lease_ttl * 1.5)
            if msg is None:
                return
            if msg.WhichOneof("msg") != "heartbeat":
                continue
            gw = self.state.gateways.get(name)
            for b in msg.heartbeat.backends:
                inst = self.state.instances.get(f"{b.app}/{b.instance_id}")
                if inst is not None and gw is not None and inst.region == gw.region:
                    try:
                        await self.ops.set_instance_health(inst, b.healthy)
                    except StoreUnavailableError:
                        pass  # health is re-reported with the next heartbeat


async def _next_or_none(iterator, timeout: float):
    try:
        return await asyncio.wait_for(iterator.__anext__(), timeout)
    except (StopAsyncIteration, TimeoutError, grpc.aio.AioRpcError):
        return None

"""The RoutingFeed servicer: `Watch` streams the routing table to GeoDNS servers and gateways.

A stream starts from the client's `last_revision` (0: a snapshot) and then sends, per revision,
what changed since the revision it has, as one serialized `RoutingUpdate` shared by every stream
at that revision (`coordinator.fanout`): N watchers of a large table hold one copy of its
snapshot. A send the client does not take within --watch-send-timeout ends the stream with
RESOURCE_EXHAUSTED (the client reconnects with its last revision).

A GeoDNS server announces itself on its stream (`server_name`, `answer_address`): checked and
kept as `dns/<name>` while the stream is open by `coordinator.dns_servers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from coordinator.access import Access, end_stream
from coordinator.dns_servers import Announcer, announcement
from coordinator.fanout import Fanout
from coordinator.operations import Operations
from coordinator.rpc_common import Caller, stream
from coordinator.servicer_common import (
    SENT,
    SENT_BYTES,
    SESSIONS,
    SLOW_READERS,
    ServicerBase,
    current_task,
    send_deadline,
)
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.errors import ValidationError

log = logging.getLogger("geomesh.coordinator")


class RoutingFeedService(ServicerBase, pbg.RoutingFeedServicer):
    def __init__(self, feed: Fanout, ops: Operations, access: Access, *, send_timeout: float = 30.0,
                 announcer: Announcer | None = None) -> None:
        super().__init__(feed, ops, access)
        self.send_timeout = send_timeout
        self.announcer = announcer  # None: announcements are checked but not kept (no lease)

    @stream("dns", "gateway", "admin")
    async def Watch(self, request: pb.WatchRoutingRequest, context, caller: Caller):
        """Yields serialized RoutingUpdates (see `wire`): every stream at one revision sends the
        same bytes object, so N watchers of a large table hold one copy of its snapshot."""
        if request.last_revision < 0:
            raise ValidationError("last_revision", "must be >= 0")
        server = announcement(request.server_name, request.answer_address, caller)
        SESSIONS.labels("routing").inc()
        handler = current_task()
        try:
            async with contextlib.AsyncExitStack() as held:
                if server is not None and self.announcer is not None:
                    await held.enter_async_context(self.announcer.held(server))  # dns/<name> while open
                await context.send_initial_metadata(())  # headers now: a later status needs no second header op
                have = request.last_revision if request.last_revision > 0 else -1
                while True:
                    delta = self.feed.changes_since(have)
                    update = self.feed.routing_update(delta, since=have)
                    if update.snapshot or update.upserts or update.removals:
                        kind = "snapshot" if update.snapshot else "delta"
                        del update  # hold only the shared bytes while the send may block
                        wire_bytes = self.feed.routing_wire(delta, since=have)
                        SENT.labels("routing", kind).inc()
                        SENT_BYTES.labels("routing").inc(len(wire_bytes))
                        with send_deadline(self.send_timeout,
                                           lambda: self._drop_slow_reader(handler, context, caller)):
                            yield wire_bytes
                    have = delta.revision
                    if self.feed.revision <= have:
                        await asyncio.shield(self.feed.changed())
        finally:
            SESSIONS.labels("routing").dec()

    def _drop_slow_reader(self, handler: asyncio.Task, context: grpc.aio.ServicerContext, caller: Caller) -> None:
        SLOW_READERS.labels("routing").inc()
        log.warning("watch stream dropped: the client took no message in time",
                    extra={"fields": {"caller": f"{caller.role}/{caller.name}", "timeout": self.send_timeout}})
        end_stream(handler, context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"slow reader: a message was not taken within {self.send_timeout:g} s; "
                   "reconnect with last_revision")

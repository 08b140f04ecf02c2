"""Follows the coordinator: RoutingFeed.Watch says when something changed, Admin/GetOverview says what.

One follower per process, whatever the number of viewers: every routing update (snapshot or
delta) marks the board dirty; after `debounce` seconds of quiet-or-not (at most one call per
`debounce`) one `GetOverview` is made and the board's new document is published to every viewer.
A slow periodic refresh (`refresh`) catches anything the feed does not carry. On any error the
page says the coordinator is unreachable, and the follower reconnects to the next address with a
growing back-off (0.2 s to 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import Targets, client_channel, insecure_metadata
from geomesh.logs import event
from geomesh.pki import Identity
from status_page.board import Board

log = logging.getLogger("geomesh.status.follower")

OVERVIEWS = Counter("geomesh_status_overview_calls_total", "Admin/GetOverview calls made (one per change, "
                    "whatever the number of viewers)")
CONNECTED = Gauge("geomesh_status_coordinator_connected", "1 while the routing feed stream is open")


@dataclass(frozen=True, slots=True)
class FollowConfig:
    coordinators: tuple[str, ...]
    identity: Identity | None  # None only with insecure
    insecure: bool = False
    debounce: float = 0.2
    refresh: float = 30.0
    call_timeout: float = 5.0


class Follower:
    def __init__(self, config: FollowConfig, board: Board, publish: Callable[[bytes], None]) -> None:
        self.config = config
        self.board = board
        self.publish = publish
        self.targets = Targets(list(config.coordinators))
        self.metadata = insecure_metadata(config.identity) if config.insecure else None

    async def run(self) -> None:
        backoff = 0.2
        while True:
            target = self.targets.current
            try:
                await self._follow(target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # grpc errors and anything unexpected: report, back off, retry
                reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                CONNECTED.set(0)
                event(log, "coordinator unreachable", level=logging.WARNING, target=target, error=reason)
                self.publish(self.board.link(False, f"{target}: {reason}"))
                self.targets.advance()
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            else:
                backoff = 0.2

    async def _follow(self, target: str) -> None:
        channel = client_channel(target, self.config.identity, insecure=self.config.insecure)
        try:
            feed = pbg.RoutingFeedStub(channel)
            admin = pbg.AdminStub(channel)
            call = feed.Watch(pb.WatchRoutingRequest(), metadata=self.metadata)
            dirty = asyncio.Event()
            reader = asyncio.create_task(self._read(call, dirty))
            try:
                await asyncio.wait_for(dirty.wait(), self.config.call_timeout * 2)  # the first snapshot
                CONNECTED.set(1)
                while not reader.done():
                    dirty.clear()
                    OVERVIEWS.inc()
                    overview = await admin.GetOverview(pb.Empty(), timeout=self.config.call_timeout,
                                                       metadata=self.metadata)
                    self.publish(self.board.apply(overview))
                    await asyncio.sleep(self.config.debounce)  # at most one call per debounce
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(_first(dirty.wait(), reader), self.config.refresh)
                if reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
                raise ConnectionError("routing feed ended")
            finally:
                reader.cancel()
                call.cancel()
        finally:
            await channel.close()

    @staticmethod
    async def _read(call, dirty: asyncio.Event) -> None:
        async for _update in call:
            dirty.set()


async def _first(wait, task: asyncio.Task) -> None:
    """Return when `wait` completes or `task` ends."""
    waiter = asyncio.ensure_future(wait)
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()

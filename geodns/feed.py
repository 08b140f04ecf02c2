"""The routing table feed from the coordinator (`geomesh.v1.RoutingFeed.Watch`).

`RoutingFeedClient.run()` keeps one Watch stream open: the first message is a snapshot, then
deltas tagged with etcd revisions, each applied with `RoutingTable.apply` and handed to
`on_table`. When the stream breaks (coordinator restarted, network gone, etcd away behind the
coordinator) it reconnects with exponential backoff and jitter, rotating through the configured
coordinator replicas, and resumes from the last revision it applied, so it receives only what it
missed (or a fresh snapshot when that history is gone). Meanwhile nothing is handed over: the
server keeps answering from the last table it had (static stability). The data path never
waits on this loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import Targets, client_channel, insecure_metadata
from geomesh.logs import event
from geomesh.pki import Identity
from geomesh.routing_table import RoutingTable

log = logging.getLogger("geodns.feed")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0


@dataclass
class FeedStatus:
    connected: bool = False
    revision: int = 0
    updates: int = 0
    reconnects: int = 0
    last_error: str = ""
    last_update_monotonic: float = 0.0


class RoutingFeedClient:
    def __init__(self, targets: list[str], identity: Identity | None, on_table: Callable[[RoutingTable], None],
                 *, insecure: bool = False, name: str = "dns", backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX) -> None:
        self.targets = Targets(targets)
        self.identity = identity
        self.insecure = insecure
        self.name = name
        self.on_table = on_table
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.table = RoutingTable()
        self.have_snapshot = False
        self.status = FeedStatus()

    def _metadata(self) -> tuple:
        return insecure_metadata(self.identity, "dns", self.name) if self.insecure else ()

    async def run(self) -> None:
        """Follow the feed until cancelled."""
        delay = self.backoff_initial
        while True:
            target = self.targets.current
            started = time.monotonic()
            got_any = await self._follow(target)
            got_any = got_any or time.monotonic() - started > 5.0  # a long quiet stream was fine too
            self.status.connected = False
            self.status.reconnects += 1
            if got_any:
                delay = self.backoff_initial
            if len(self.targets) > 1:
                self.targets.advance()
            sleep = delay * (0.5 + random.random() / 2)
            event(log, "routing feed reconnecting", logging.INFO if got_any else logging.WARNING,
                  target=target, retry_in_s=round(sleep, 3), error=self.status.last_error,
                  revision=self.table.revision)
            await asyncio.sleep(sleep)
            delay = min(self.backoff_max, delay * 2)

    async def _follow(self, target: str) -> bool:
        """One Watch stream; True when at least one update arrived on it."""
        got_any = False
        channel = client_channel(target, self.identity, insecure=self.insecure)
        try:
            stub = pbg.RoutingFeedStub(channel)
            last = self.table.revision if self.have_snapshot else 0
            call = stub.Watch(pb.WatchRoutingRequest(last_revision=last), metadata=self._metadata())
            async for update in call:
                if not got_any:
                    event(log, "routing feed connected", target=target, resumed_from=last)
                got_any = True
                self.status.connected = True
                self._apply(update)
            self.status.last_error = "stream ended"
        except grpc.aio.AioRpcError as exc:
            self.status.last_error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad update must not kill the feed: reconnect with a snapshot
            log.exception("routing feed update failed")
            self.status.last_error = f"{type(exc).__name__}: {exc}"
            self.have_snapshot = False
        finally:
            await channel.close(grace=None)
        return got_any

    def _apply(self, update: pb.RoutingUpdate) -> None:
        if not update.snapshot and not self.have_snapshot:
            # a delta before any snapshot cannot be trusted to describe the whole table
            raise ValueError("the feed sent a delta before a snapshot")
        self.table = self.table.apply(update)
        self.have_snapshot = True
        self.status.revision = self.table.revision
        self.status.updates += 1
        self.status.last_update_monotonic = time.monotonic()
        self.on_table(self.table)

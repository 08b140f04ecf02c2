"""The routing table feed from the coordinator (`geomesh.v1.RoutingFeed.Watch`).

`RoutingFeedClient.run()` keeps one Watch stream open: the first message is a snapshot, then
deltas tagged with etcd revisions, each applied with `RoutingTable.apply` and handed to
`on_table`. When the stream breaks (coordinator restarted, network gone, etcd away behind the
coordinator) it reconnects with exponential backoff and jitter, rotating through the configured
coordinator replicas (`geomesh.follow`, the loop the gateway's session uses too), and resumes from
the last revision it applied, so it receives only what it missed (or a fresh snapshot when that
history is gone). Meanwhile nothing is handed over: the server keeps answering from the last table
it had (static stability). The data path never waits on this loop.

Static stability across restarts (docs/static-stability.md): with a state file (`--state-dir`)
every applied table is saved (debounced, atomically, `geomesh.state_file`, kind "geodns", owner
the zone) and `load_saved` reads it back at start, so a restarted server answers from its last
view at once and the feed resumes from that revision. A snapshot that arrives before the
gateways reconnected (a restarted coordinator whose etcd lease expired during the outage) must
not empty a region: `hold_dropped` (pure) keeps, for `hold` seconds, the gateways a region had
routable when a snapshot leaves it none, until one of its own gateways is routable again. A
delta that drops them is a real change and is served as it comes.

The server announces itself on its stream (`WatchRoutingRequest.server_name`, `answer_address`:
`announcement` picks them, pure): while the stream is open the coordinator lists it as a live DNS
server and, before an ACME challenge is validated, checks that it answers the challenge's TXT. A
coordinator that refuses the announcement (INVALID_ARGUMENT or PERMISSION_DENIED naming
`server_name` or `answer_address`) gets the stream again without it: following the feed matters
more than being listed (logged as an error).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import grpc
from prometheus_client import Gauge

from geomesh import state_file
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import Targets, client_channel, insecure_metadata
from geomesh.follow import Backoff, Retry, follow
from geomesh.logs import event
from geomesh.pki import Identity
from geomesh.routing_table import RoutingTable

log = logging.getLogger("geodns.feed")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
BACKOFF_JITTER = (0.5, 1.0)  # the pause is the delay times a factor drawn from this range
DEFAULT_HOLD = 15.0  # seconds a snapshot's dropped region keeps its previous gateways
STATE_KIND = "geodns"

STATE_AGE = Gauge("geomesh_dns_state_age_seconds", "seconds since the view served was last known current "
                  "(0 while the feed is connected; -1 before any view)")


def load_saved(path: Path, zone: str, max_age: float = 0.0) -> tuple[RoutingTable, float] | None:
    """The routing table saved at `path` for `zone` and when it was written, or None (none, or
    refused: logged)."""
    saved = state_file.load(path, kind=STATE_KIND, owner=zone, max_age=max_age)
    if saved is None:
        return None
    try:
        update = pb.RoutingUpdate.FromString(saved.payload)
        if not update.snapshot:
            raise ValueError("not a snapshot")
        return RoutingTable().apply(update), saved.written_at
    except Exception as exc:  # a checksummed payload we cannot parse: refuse it, never crash
        state_file.REFUSED.labels(STATE_KIND, "corrupt").inc()
        event(log, "saved state refused, starting without it", logging.ERROR, path=str(path),
              reason="corrupt", error=f"payload: {type(exc).__name__}: {exc}")
        return None


def saved_of(table: RoutingTable, zone: str) -> state_file.Saved:
    return state_file.Saved(STATE_KIND, zone, table.revision, time.time(), table.to_snapshot().SerializeToString())


def announcement(identity_name: str, listen: tuple[str, int], port: int, announce_address: str
                 ) -> tuple[str, str] | None:
    """(server_name, answer_address) this server announces on its feed: its identity name and
    `announce_address`, else the first listen address with its bound `port`; None when that
    address is a wildcard (0.0.0.0, ::: nobody can query it) and no `announce_address` was given."""
    if announce_address:
        return identity_name, announce_address
    host = listen[0]
    if ipaddress.ip_address(host).is_unspecified:
        return None
    return identity_name, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hold_dropped(served: RoutingTable, new: RoutingTable, *, snapshot: bool, held: Mapping[str, float],
                 now: float, hold: float) -> tuple[RoutingTable, dict[str, float]]:
    """The table to serve after `new` arrived, and the gateways held (name -> until when).

    For each region that has no routable gateway in `new` while `served` had some: when `new`
    came as a snapshot, or those gateways were already held, keep the served records of those
    gateways until their hold ends (`hold` seconds after the snapshot). A region with a routable
    gateway of its own in `new` holds nothing."""
    if hold <= 0:
        return new, {}
    routable_in: dict[str, bool] = {}
    for g in new.gateways.values():
        routable_in[g.region] = routable_in.get(g.region, False) or g.routable
    keep: dict[str, float] = {}
    for name, g in served.gateways.items():
        if not g.routable or routable_in.get(g.region, False):
            continue
        until = held.get(name, now + hold if snapshot else 0.0)
        if until > now:
            keep[name] = until
    if not keep:
        return new, {}
    gateways = dict(new.gateways)
    for name in keep:
        gateways[name] = served.gateways[name]
    return dataclasses.replace(new, gateways=MappingProxyType(gateways)), keep


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
                 backoff_max: float = BACKOFF_MAX, saved: RoutingTable | None = None,
                 writer: state_file.DebouncedWriter | None = None, zone: str = "",
                 hold: float = DEFAULT_HOLD, saved_at: float = 0.0,
                 announce: tuple[str, str] | None = None) -> None:
        self.targets = Targets(targets)
        self.identity = identity
        self.insecure = insecure
        self.name = name
        self.on_table = on_table
        self.backoff = Backoff(backoff_initial, backoff_max, jitter=BACKOFF_JITTER)
        self.table = saved if saved is not None else RoutingTable()
        self.have_snapshot = saved is not None  # resume from the saved revision
        self.served = self.table  # what on_table last got (the table, or it with held gateways)
        self.held: dict[str, float] = {}
        self.hold = hold
        self.announce = announce  # (server_name, answer_address), or None: a plain watcher
        self.writer = writer
        self.zone = zone
        self._hold_timer: asyncio.TimerHandle | None = None
        self.status = FeedStatus(revision=self.table.revision)
        # wall-clock time the served table was last known current (the saved file's time at start)
        self.current_at = saved_at if saved is not None else 0.0
        STATE_AGE.set_function(self.state_age)

    def _metadata(self) -> tuple:
        return insecure_metadata(self.identity, "dns", self.name) if self.insecure else ()

    async def run(self) -> None:
        """Follow the feed until cancelled."""
        await follow(self._follow, targets=self.targets, backoff=self.backoff, on_retry=self._retrying)

    def _retrying(self, retry: Retry) -> None:
        self.status.connected = False
        self.status.reconnects += 1
        event(log, "routing feed reconnecting", logging.INFO if retry.healthy else logging.WARNING,
              target=retry.target, retry_in_s=round(retry.pause, 3), error=self.status.last_error,
              revision=self.table.revision)

    async def _follow(self, target: str) -> bool:
        """One Watch stream; True when at least one update arrived on it."""
        got_any = False
        channel = client_channel(target, self.identity, insecure=self.insecure)
        try:
            stub = pbg.RoutingFeedStub(channel)
            last = self.table.revision if self.have_snapshot else 0
            server_name, address = self.announce or ("", "")
            request = pb.WatchRoutingRequest(last_revision=last, server_name=server_name, answer_address=address)
            call = stub.Watch(request, metadata=self._metadata())
            async for update in call:
                if not got_any:
                    event(log, "routing feed connected", target=target, resumed_from=last)
                got_any = True
                self.status.connected = True
                self._apply(update)
            self.status.last_error = "stream ended"
        except grpc.aio.AioRpcError as exc:
            self.status.last_error = f"{exc.code().name}: {exc.details()}"
            self._refused(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad update must not kill the feed: reconnect with a snapshot
            log.exception("routing feed update failed")
            self.status.last_error = f"{type(exc).__name__}: {exc}"
            self.have_snapshot = False
        finally:
            await channel.close(grace=None)
        return got_any

    def _refused(self, exc: grpc.aio.AioRpcError) -> None:
        """Follow the feed without announcing when the coordinator refused the announcement."""
        details = exc.details() or ""
        if (self.announce is not None
                and exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
                and ("server_name" in details or "answer_address" in details)):
            event(log, "the coordinator refused this server's announcement: following the feed without it; "
                  "ACME challenges will not wait for this server", logging.ERROR, server_name=self.announce[0],
                  answer_address=self.announce[1], error=details[:200])
            self.announce = None

    def _apply(self, update: pb.RoutingUpdate) -> None:
        if not update.snapshot and not self.have_snapshot:
            # a delta before any snapshot cannot be trusted to describe the whole table
            raise ValueError("the feed sent a delta before a snapshot")
        self.table = self.table.apply(update)
        self.have_snapshot = True
        self.status.revision = self.table.revision
        self.status.updates += 1
        self.status.last_update_monotonic = time.monotonic()
        self.current_at = time.time()
        self._serve(snapshot=update.snapshot)

    def state_age(self) -> float:
        if self.status.connected:
            self.current_at = time.time()
            return 0.0
        return time.time() - self.current_at if self.current_at else -1.0

    def _serve(self, *, snapshot: bool) -> None:
        """Hand the table (with any held gateways) to the server; save it when nothing is held
        (a held table is not what etcd says: after a restart the feed resumes from the last
        table that was)."""
        before = set(self.held)
        self.served, self.held = hold_dropped(self.served, self.table, snapshot=snapshot, held=self.held,
                                              now=time.monotonic(), hold=self.hold)
        if set(self.held) != before:
            event(log, "gateways held after a snapshot dropped their region" if self.held
                  else "gateway hold over", logging.WARNING if self.held else logging.INFO,
                  held=sorted(self.held), hold_s=self.hold, revision=self.table.revision)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.held:
            delay = max(0.0, min(self.held.values()) - time.monotonic()) + 0.01
            self._hold_timer = asyncio.get_running_loop().call_later(delay, self._serve_after_hold)
        self.on_table(self.served)
        if self.writer is not None and not self.held:
            table, zone = self.table, self.zone
            self.writer.changed(lambda: saved_of(table, zone))

    def _serve_after_hold(self) -> None:
        self._hold_timer = None
        self._serve(snapshot=False)

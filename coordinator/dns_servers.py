"""The live GeoDNS servers: who announces itself on the RoutingFeed, and its `dns/<name>` key.

A GeoDNS server opens `RoutingFeed.Watch` with `server_name` (its identity's name) and
`answer_address` (the "ip:port" it answers on over UDP). `announcement` checks both (pure: a
DNS label; an IP address that can be queried, with a port 1-65535; INVALID_ARGUMENT naming the
field) and who sends them: only a `dns` identity, and only under its own name (PERMISSION_DENIED),
so one server cannot stand in for another. While the stream is open `Announcer.held` keeps
`/geomesh/v1/dns/<name>` = {"address": ..., "replica": ...} bound to this replica's lease
(`store.ReplicaLease`, as a gateway's `alive/<g>`): written again under a new lease when etcd
expired the old one, retried while etcd is away (the stream goes on: DNS must follow the feed
whatever etcd does), and deleted when the stream ends -- only if it is still the one this stream
wrote (a server that reconnected elsewhere keeps the key that replica wrote); the delete is
retried for about 20 s while etcd is away. A replica that dies
takes its keys with its lease. The cache mirrors the keys (`coordinator.state`:
`Snapshot.dns_servers`, name -> address): the servers the ACME order asks
(`coordinator.dns_check`) before the CA validates a challenge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from coordinator.rpc_common import Caller
from coordinator.state import key
from coordinator.store import EtcdStore, ReplicaLease, Txn
from geomesh import validate
from geomesh.errors import PermissionDeniedError, ValidationError

log = logging.getLogger("geomesh.coordinator.dns_servers")

RETRY_INITIAL = 0.2
RETRY_MAX = 5.0
WITHDRAW_ATTEMPTS = 8  # about 20 s of retries, then the key is left to the lease
REPLICA = f"{socket.gethostname()}/{os.getpid()}"


@dataclass(frozen=True, slots=True)
class DnsServer:
    """A GeoDNS server as it announced itself: its name and the UDP address it answers on."""

    name: str
    address: str  # canonical "ip:port" or "[v6]:port"

    def __post_init__(self) -> None:
        validate.dns_label("server_name", self.name)
        object.__setattr__(self, "address", validate.query_address("answer_address", self.address))


def announcement(server_name: str, address: str, caller: Caller) -> DnsServer | None:
    """What a Watch request announces (None: nothing, the caller is a plain watcher), checked."""
    if not server_name and not address:
        return None
    if not server_name:
        raise ValidationError("server_name", "is required with answer_address")
    if not address:
        raise ValidationError("answer_address", "is required with server_name")
    server = DnsServer(server_name, address)
    if caller.role != "dns":
        raise PermissionDeniedError(f"role {caller.role!r} may not announce a DNS server (server_name): only dns")
    if caller.name != server.name:
        raise PermissionDeniedError(f"dns {caller.name!r} may announce only itself, not server_name {server.name!r}")
    return server


def value_of(server: DnsServer, replica: str = REPLICA) -> bytes:
    return json.dumps({"address": server.address, "replica": replica}, sort_keys=True).encode()


class Announcer:
    """Holds the `dns/<name>` keys of the announcing streams this replica serves."""

    def __init__(self, store: EtcdStore, lease: ReplicaLease) -> None:
        self.store = store
        self.lease = lease
        self._cleanups: set[asyncio.Task] = set()

    @contextlib.asynccontextmanager
    async def held(self, server: DnsServer) -> AsyncIterator[None]:
        """`dns/<name>` kept while the block runs, then withdrawn (see the module's docstring)."""
        written = [0]  # the revision of this stream's last write (0: none yet)
        stop = asyncio.Event()
        keeper = asyncio.create_task(self._keep(server, written, stop), name=f"dns-announce-{server.name}")
        try:
            yield
        finally:
            stop.set()  # not cancelled: a write in flight finishes, so its revision is known
            # grpc may cancel the stream's handler again while it cleans up: the delete is its own task
            cleanup = asyncio.create_task(self._withdraw(server, keeper, written))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)

    async def _keep(self, server: DnsServer, written: list[int], stop: asyncio.Event) -> None:
        k = key("dns", server.name)
        delay = RETRY_INITIAL
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    lease_id = await self.lease.ensure()
                    lost = self.lease.lost
                    result = await self.store.txn(Txn().put(k, value_of(server), lease=lease_id))
                    written[0] = result.revision
                    log.info("dns server announced",
                             extra={"fields": {"server": server.name, "address": server.address}})
                    delay = RETRY_INITIAL
                    # until the stream ends, or etcd expired the lease: then written again under a new one
                    await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
                except Exception as exc:  # noqa: BLE001 - etcd away (or a grpc error): the stream goes on
                    log.warning("dns server announcement not written; retrying",
                                extra={"fields": {"server": server.name, "error": str(exc), "retry_in_s": delay}})
                    await asyncio.wait({stopped}, timeout=delay)
                    delay = min(RETRY_MAX, delay * 2)
        finally:
            stopped.cancel()

    async def _withdraw(self, server: DnsServer, keeper: asyncio.Task, written: list[int]) -> None:
        await keeper  # ends at once, or when its write in flight is done (the store's timeout bounds it)
        if not written[0]:
            return
        k = key("dns", server.name)
        delay = RETRY_INITIAL
        for _ in range(WITHDRAW_ATTEMPTS):
            try:
                await self.store.txn(Txn().mod_equals(k, written[0]).delete(k))
            except Exception as exc:  # noqa: BLE001 - etcd away: try again, unless the lease took the key
                log.warning("dns server announcement not withdrawn; retrying",
                            extra={"fields": {"server": server.name, "error": str(exc), "retry_in_s": delay}})
                if self.lease.lost.done():
                    return
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            log.info("dns server withdrawn", extra={"fields": {"server": server.name}})
            return

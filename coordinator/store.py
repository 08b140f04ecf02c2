"""The etcd store: every read, write, lease and watch the coordinator makes goes through here.

Built on aetcd's connection and generated etcd stubs (`aetcd.rpc`). Each unary call has a
deadline; a call that fails because etcd is unreachable raises `StoreUnavailableError` (mapped to
UNAVAILABLE), so the coordinator never hangs on a dead store. Writes that must not race are single
transactions with compares (`Txn`). Leases are kept alive over one bidirectional stream for all
gateways. `watch_prefix` is the one watch a coordinator runs: it yields batches of events, one
batch per etcd revision, resumes from the last revision after a disconnect, and reports
compaction so the caller can reload a consistent snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aetcd
import grpc
from aetcd import rpc
from prometheus_client import Counter, Histogram

from geomesh.errors import StoreUnavailableError

log = logging.getLogger("geomesh.store")

ETCD_RTT = Histogram("geomesh_etcd_request_seconds", "etcd round trips", ["op"],
                     buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5))
ETCD_ERRORS = Counter("geomesh_etcd_errors_total", "etcd calls that failed", ["op", "code"])


def prefix_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    key: bytes
    value: bytes | None  # None: deleted
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Compacted:
    """The watch start revision was compacted away: reload a snapshot, then watch again."""

    compact_revision: int


# -- transaction building -------------------------------------------------------------------

@dataclass(slots=True)
class Txn:
    """A transaction: all compares true => success ops, else failure ops (atomically)."""

    compares: list = field(default_factory=list)
    success: list = field(default_factory=list)
    failure: list = field(default_factory=list)

    def absent(self, key: bytes) -> Txn:
        self.compares.append(rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                                         create_revision=0))
        return self

    def present(self, key: bytes) -> Txn:
        self.compares.append(rpc.Compare(key=key, result=rpc.Compare.GREATER, target=rpc.Compare.CREATE,
                                         create_revision=0))
        return self

    def mod_equals(self, key: bytes, revision: int) -> Txn:
        """The key's last change was at `revision` (0: the key does not exist)."""
        self.compares.append(rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                                         mod_revision=revision))
        return self

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Txn:
        self.success.append(rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease)))
        return self

    def delete(self, key: bytes, *, prefix: bool = False) -> Txn:
        req = rpc.DeleteRangeRequest(key=key, range_end=prefix_end(key) if prefix else b"")
        self.success.append(rpc.RequestOp(request_delete_range=req))
        return self

    def else_get(self, key: bytes) -> Txn:
        self.failure.append(rpc.RequestOp(request_range=rpc.RangeRequest(key=key)))
        return self


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    ranges: list[list[KV]]


def _kv(m) -> KV:  # noqa: ANN001 - etcd KeyValue message
    return KV(m.key, m.value, m.create_revision, m.mod_revision, m.lease)


class EtcdStore:
    def __init__(self, endpoint: str, *, timeout: float = 2.0) -> None:
        host, _, port = endpoint.rpartition(":")
        self.endpoint = endpoint
        self.timeout = timeout
        self._client = aetcd.Client(host=host.strip("[]") or "127.0.0.1", port=int(port), timeout=timeout,
                                    options={"grpc.initial_reconnect_backoff_ms": 100,
                                             "grpc.max_reconnect_backoff_ms": 1000})

    async def connect(self) -> None:
        await self._client.connect()

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, op: str, method: str, request, timeout: float | None = None):  # noqa: ANN001, ANN202
        """Call `<stub>.<Method>` ("kv.Range", "lease.LeaseGrant") with a deadline."""
        await self._client.connect()
        stub_name, _, rpc_name = method.partition(".")
        fn = getattr(self._client.kvstub if stub_name == "kv" else self._client.leasestub, rpc_name)
        start = time.perf_counter()
        try:
            return await fn(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            ETCD_ERRORS.labels(op, exc.code().name).inc()
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED):
                raise StoreUnavailableError(f"etcd at {self.endpoint} is unavailable ({exc.code().name})") from None
            raise
        finally:
            ETCD_RTT.labels(op).observe(time.perf_counter() - start)

    async def get(self, key: bytes) -> KV | None:
        resp = await self._call("range", "kv.Range", rpc.RangeRequest(key=key))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[KV]]:
        """Every key under `prefix` at one revision: (revision, kvs)."""
        resp = await self._call("range", "kv.Range",
                                rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout=10)
        return resp.header.revision, [_kv(m) for m in resp.kvs]

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        resp = await self._call("put", "kv.Put", rpc.PutRequest(key=key, value=value, lease=lease))
        return resp.header.revision

    async def txn(self, txn: Txn) -> TxnResult:
        resp = await self._call("txn", "kv.Txn",
                                rpc.TxnRequest(compare=txn.compares, success=txn.success, failure=txn.failure))
        ranges = [[_kv(m) for m in r.response_range.kvs] for r in resp.responses
                  if r.WhichOneof("response") == "response_range"]
        return TxnResult(resp.succeeded, resp.header.revision, ranges)

    # -- leases --------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        resp = await self._call("lease_grant", "lease.LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl))
        return resp.ID

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call("lease_revoke", "lease.LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # already expired: nothing to do
                raise

    async def keepalive_forever(self, leases: LeaseSet, interval: float) -> None:
        """Refresh every lease in `leases` each `interval` seconds over one stream; reconnects."""
        while True:
            try:
                await self._keepalive_stream(leases, interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd away: keep trying, leases may expire
                log.warning("lease keepalive stream failed", extra={"fields": {"error": repr(exc)}})
            await asyncio.sleep(min(interval, 0.5))

    async def _keepalive_stream(self, leases: LeaseSet, interval: float) -> None:
        await self._client.connect()
        queue: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator:
            while True:
                yield await queue.get()

        async def pump() -> None:
            while True:
                for lease_id in leases.ids():
                    queue.put_nowait(rpc.LeaseKeepAliveRequest(ID=lease_id))
                await asyncio.sleep(interval)

        call = self._client.leasestub.LeaseKeepAlive(requests())
        pump_task = asyncio.create_task(pump())
        try:
            async for reply in call:
                if reply.TTL <= 0:
                    leases.expired(reply.ID)
        finally:
            pump_task.cancel()
            call.cancel()

    # -- the watch -------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event] | Compacted]:
        """Batches of events (one etcd revision each) under `prefix` from `start_revision` on.

        Raises `StoreUnavailableError` when the stream breaks; the caller resumes by calling again
        with the revision after the last batch it applied.
        """
        await self._client.connect()
        stub = rpc.WatchStub(self._client.channel)
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start_revision, progress_notify=True))
        stop = asyncio.Event()

        async def requests() -> AsyncIterator:
            yield create
            await stop.wait()

        call = stub.Watch(requests())
        try:
            async for resp in call:
                if resp.compact_revision:
                    yield Compacted(resp.compact_revision)
                    return
                if resp.canceled:
                    raise StoreUnavailableError(f"etcd canceled the watch: {resp.cancel_reason}")
                batch: list[Event] = []
                for ev in resp.events:
                    if batch and batch[-1].mod_revision != ev.kv.mod_revision:
                        yield batch
                        batch = []
                    deleted = ev.type == rpc.Event.DELETE
                    batch.append(Event(ev.kv.key, None if deleted else ev.kv.value, ev.kv.mod_revision))
                if batch:
                    yield batch
        except grpc.aio.AioRpcError as exc:
            raise StoreUnavailableError(f"watch stream to etcd broke ({exc.code().name})") from None
        finally:
            stop.set()
            call.cancel()
        raise StoreUnavailableError("watch stream to etcd ended")


class ReplicaLease:
    """The one lease a coordinator replica holds for all its gateways' `alive` keys.

    `ensure()` grants it on first use and again after etcd expired it; `lost` is a future resolved
    when etcd reports the current lease gone (sessions then re-mark their gateways alive).
    """

    def __init__(self, store: EtcdStore, leases: LeaseSet, ttl: int) -> None:
        self.store = store
        self.leases = leases
        self.ttl = ttl
        self.id: int | None = None
        self._lost: asyncio.Future | None = None
        self._lock = asyncio.Lock()

    @property
    def lost(self) -> asyncio.Future:
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    async def ensure(self) -> int:
        async with self._lock:
            if self.id is None or self.lost.done():
                lease_id = await self.store.grant(self.ttl)
                self._lost = asyncio.get_running_loop().create_future()
                self.leases.add(lease_id, self._lost)
                self.id = lease_id
            return self.id

    async def revoke(self) -> None:
        if self.id is not None:
            self.leases.discard(self.id)
            await self.store.revoke(self.id)
            self.id = None


class LeaseSet:
    """The leases a coordinator keeps alive; each one's future resolves when etcd says it is gone."""

    def __init__(self) -> None:
        self._ids: dict[int, asyncio.Future] = {}

    def add(self, lease_id: int, lost: asyncio.Future) -> None:
        self._ids[lease_id] = lost

    def discard(self, lease_id: int) -> None:
        self._ids.pop(lease_id, None)

    def ids(self) -> Sequence[int]:
        return tuple(self._ids)

    def expired(self, lease_id: int) -> None:
        lost = self._ids.pop(lease_id, None)
        if lost is not None and not lost.done():
            lost.set_result(None)

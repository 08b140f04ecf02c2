"""The etcd store: every read, write, lease and watch the coordinator makes goes through here.

It talks to an etcd cluster through aetcd's generated stubs (`aetcd.rpc`) over channels it opens
itself: one gRPC channel per member endpoint (`--etcd`, a list), plaintext or TLS with our own CA,
client certificate and key (`--etcd-ca/--etcd-cert/--etcd-key`). aetcd 1.0's `Client` opens one
insecure channel to one host, so only its stubs are used. Calls go to one *current* member; a call
that fails with UNAVAILABLE or DEADLINE_EXCEEDED (member dead, no leader, partitioned) moves the
store to the next member, and so does a current channel found in TRANSIENT_FAILURE before a call.
Reads are linearizable (etcd's default) and retried once on the next member; writes are never
retried here, because a failed write may have applied: the caller sees UNAVAILABLE and decides.
The watch and the lease keepalive stream ask etcd to cancel them when their member loses its
leader (`hasleader` metadata), so a member cut off from the quorum cannot hold them silently.

Each unary call has a deadline; a call that fails because etcd is unreachable raises
`StoreUnavailableError` (mapped to UNAVAILABLE), so the coordinator never hangs on a dead store.
Writes that must not race are single transactions with compares (`Txn`). Leases are kept alive
over one bidirectional stream for all gateways. `watch_prefix` is the one watch a coordinator
runs: it yields batches of events, one batch per etcd revision, resumes from the last revision
after a disconnect, and reports compaction so the caller can reload a consistent snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aetcd import rpc
from prometheus_client import Counter, Gauge, Histogram

from geomesh.errors import StoreUnavailableError, ValidationError

log = logging.getLogger("geomesh.store")

ETCD_RTT = Histogram("geomesh_etcd_request_seconds", "etcd round trips", ["op"],
                     buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5))
ETCD_ERRORS = Counter("geomesh_etcd_errors_total", "etcd calls that failed", ["op", "code"])
ETCD_FAILOVERS = Counter("geomesh_etcd_failovers_total",
                         "times the store left an etcd member for the next one", ["endpoint", "reason"])
ETCD_CURRENT = Gauge("geomesh_etcd_endpoint_current", "1 for the etcd member the store uses now", ["endpoint"])

MAX_ENDPOINTS = 32
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
UNAVAILABLE_CODES = (*FAILOVER_CODES, grpc.StatusCode.CANCELLED)
# etcd answers a request it could not commit in time (an election under way) with UNKNOWN and one of
# these texts: the write may or may not have applied, as with UNAVAILABLE
ETCD_TIMEOUT_DETAILS = ("context deadline exceeded", "etcdserver: request timed out",
                        "etcdserver: leader changed", "etcdserver: no leader")


def unavailable(code: grpc.StatusCode, details: str) -> bool:
    """Whether an etcd call that failed with `code`/`details` means "the store is unavailable now"
    (mapped to UNAVAILABLE for the caller) rather than a request error."""
    return code in UNAVAILABLE_CODES or (code == grpc.StatusCode.UNKNOWN
                                         and any(d in details for d in ETCD_TIMEOUT_DETAILS))
REQUIRE_LEADER = (("hasleader", "true"),)  # etcd's WithRequireLeader: streams end when the member has no leader
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # find a member that vanished without a RST; etcd refuses pings more often than every 5 s
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


# -- where etcd is ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EtcdEndpoint:
    """One etcd member's client URL: host, port and the scheme written (None: none written)."""

    host: str
    port: int
    scheme: str | None = None

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.target}" if self.scheme else self.target


def parse_endpoint(text: str) -> EtcdEndpoint:
    """`host:port`, `[v6]:port`, `http://host:port` or `https://host:port` (a trailing / allowed)."""
    raw = text.strip()
    scheme: str | None = None
    if "://" in raw:
        scheme, _, raw = raw.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValidationError("etcd", f"{text!r}: scheme must be http or https")
        raw = raw.rstrip("/")
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValidationError("etcd", f"{text!r} is not host:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValidationError("etcd", f"{text!r}: unclosed [ in the host")
        host = host[1:-1]
    elif ":" in host:
        raise ValidationError("etcd", f"{text!r}: write an IPv6 host in brackets, [::1]:2379")
    if not host or any(c in host for c in "/@?#[] "):
        raise ValidationError("etcd", f"{text!r}: bad host")
    return EtcdEndpoint(host, int(port), scheme)


def parse_endpoints(values: str | Sequence[str]) -> tuple[EtcdEndpoint, ...]:
    """Endpoints from comma-separated and/or repeated values, in the order given."""
    items = [values] if isinstance(values, str) else list(values)
    pieces = [piece for item in items for piece in item.split(",")]
    if not pieces or any(not piece.strip() for piece in pieces):
        raise ValidationError("etcd", "an endpoint is empty (write host:port[,host:port...])")
    endpoints = tuple(parse_endpoint(piece) for piece in pieces)
    if len(endpoints) > MAX_ENDPOINTS:
        raise ValidationError("etcd", f"at most {MAX_ENDPOINTS} endpoints")
    targets = [e.target for e in endpoints]
    for t in targets:
        if targets.count(t) > 1:
            raise ValidationError("etcd", f"{t} is listed twice")
    return endpoints


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """The etcd cluster: its members' endpoints and the TLS files to reach them (checked on build).

    TLS is on when any endpoint says https:// or a CA, certificate or key is given; then every
    endpoint must be https:// or bare. No CA: the system's roots verify the members.
    """

    endpoints: tuple[EtcdEndpoint, ...]
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValidationError("etcd", "at least one endpoint")
        if (self.cert is None) != (self.key is None):
            raise ValidationError("etcd_cert" if self.cert is None else "etcd_key",
                                  "--etcd-cert and --etcd-key go together")
        schemes = {e.scheme for e in self.endpoints} - {None}
        if schemes == {"http", "https"}:
            raise ValidationError("etcd", "mixes http:// and https:// endpoints")
        if self.tls and "http" in schemes:
            raise ValidationError("etcd", "http:// endpoint with --etcd-ca/--etcd-cert (TLS): write https://")

    @property
    def tls(self) -> bool:
        return any(e.scheme == "https" for e in self.endpoints) or any(
            f is not None for f in (self.ca, self.cert, self.key))

    @classmethod
    def parse(cls, etcd: str | Sequence[str], *, ca: Path | None = None, cert: Path | None = None,
              key: Path | None = None) -> EtcdConfig:
        return cls(parse_endpoints(etcd), ca, cert, key)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials from the files (read now), or None for plaintext."""
        if not self.tls:
            return None

        def read(name: str, path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValidationError(name, f"cannot read {path}: {exc.strerror}") from None

        return grpc.ssl_channel_credentials(root_certificates=read("etcd_ca", self.ca),
                                            private_key=read("etcd_key", self.key),
                                            certificate_chain=read("etcd_cert", self.cert))


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


def never_sent(code: grpc.StatusCode, details: str) -> bool:
    """The call failed before any member got it (no connection): safe to send again, even a write."""
    return code == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect to all addresses")


def _kv(m) -> KV:  # noqa: ANN001 - etcd KeyValue message
    return KV(m.key, m.value, m.create_revision, m.mod_revision, m.lease)


class EtcdStore:
    """The coordinator's view of the etcd cluster: one current member, failover to the next."""

    def __init__(self, target: str | Sequence[str] | EtcdConfig, *, timeout: float = 2.0) -> None:
        self.config = target if isinstance(target, EtcdConfig) else EtcdConfig.parse(target)
        self.timeout = timeout
        self._credentials = self.config.credentials()
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._current = 0
        ETCD_CURRENT.labels(str(self.config.endpoints[0])).set(1)

    @property
    def endpoint(self) -> str:
        """The member calls go to now."""
        return str(self.config.endpoints[self._current])

    async def connect(self) -> None:
        self._pick()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    def _channel(self, index: int) -> grpc.aio.Channel:
        channel = self._channels.get(index)
        if channel is None:
            target = self.config.endpoints[index].target
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
            self._channels[index] = channel
        return channel

    def _pick(self) -> tuple[int, grpc.aio.Channel]:
        """The current member and its channel; leaves a member whose channel is down for the next."""
        index = self._current
        channel = self._channel(index)
        if len(self.config.endpoints) > 1 and \
                channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self._failed(index, "transient_failure")
            index = self._current
            channel = self._channel(index)
        return index, channel

    def _failed(self, index: int, reason: str) -> None:
        """The call on member `index` failed for `reason`: move on, unless another call did already."""
        if index != self._current or len(self.config.endpoints) == 1:
            return
        old = self.config.endpoints[index]
        self._current = (index + 1) % len(self.config.endpoints)
        new = self.config.endpoints[self._current]
        ETCD_FAILOVERS.labels(str(old), reason).inc()
        ETCD_CURRENT.labels(str(old)).set(0)
        ETCD_CURRENT.labels(str(new)).set(1)
        log.warning("etcd failover", extra={"fields": {"from": str(old), "to": str(new), "reason": reason}})

    def _unavailable(self, index: int, exc: grpc.aio.AioRpcError, what: str) -> StoreUnavailableError:
        if exc.code() in FAILOVER_CODES:
            self._failed(index, exc.code().name.lower())
        endpoint = self.config.endpoints[index]
        return StoreUnavailableError(f"{what} at {endpoint} is unavailable ({exc.code().name}: {exc.details()})")

    async def _call(self, op: str, method: str, request, timeout: float | None = None,  # noqa: ANN001, ANN202
                    *, retry: bool = False):
        """Call `<stub>.<Method>` ("kv.Range", "lease.LeaseGrant") with a deadline on the current
        member, then once on the next member if the first never got the call (no connection) or,
        with `retry` (reads only), after any failover error."""
        stub_name, _, rpc_name = method.partition(".")
        attempts = 2 if len(self.config.endpoints) > 1 else 1
        for attempt in range(attempts):
            index, channel = self._pick()
            stub = rpc.KVStub(channel) if stub_name == "kv" else rpc.LeaseStub(channel)
            start = time.perf_counter()
            try:
                return await getattr(stub, rpc_name)(request, timeout=timeout or self.timeout)
            except grpc.aio.AioRpcError as exc:
                ETCD_ERRORS.labels(op, exc.code().name).inc()
                if not unavailable(exc.code(), exc.details() or ""):
                    raise
                error = self._unavailable(index, exc, "etcd")
                again = never_sent(exc.code(), exc.details() or "") or (retry and exc.code() in FAILOVER_CODES)
                if attempt + 1 == attempts or not again:
                    raise error from None
            finally:
                ETCD_RTT.labels(op).observe(time.perf_counter() - start)
        raise AssertionError("unreachable")

    async def get(self, key: bytes) -> KV | None:
        resp = await self._call("range", "kv.Range", rpc.RangeRequest(key=key), retry=True)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[KV]]:
        """Every key under `prefix` at one revision: (revision, kvs)."""
        resp = await self._call("range", "kv.Range",
                                rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout=10,
                                retry=True)
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
        index, channel = self._pick()
        queue: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator:
            while True:
                yield await queue.get()

        async def pump() -> None:
            while True:
                for lease_id in leases.ids():
                    queue.put_nowait(rpc.LeaseKeepAliveRequest(ID=lease_id))
                await asyncio.sleep(interval)

        call = rpc.LeaseStub(channel).LeaseKeepAlive(requests(), metadata=REQUIRE_LEADER)
        pump_task = asyncio.create_task(pump())
        try:
            async for reply in call:
                if reply.TTL <= 0:
                    leases.expired(reply.ID)
            raise StoreUnavailableError(f"lease keepalive stream to {self.config.endpoints[index]} ended")
        except grpc.aio.AioRpcError as exc:
            raise self._unavailable(index, exc, "lease keepalive stream") from None
        finally:
            pump_task.cancel()
            call.cancel()

    # -- the watch -------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Event] | Compacted]:
        """Batches of events (one etcd revision each) under `prefix` from `start_revision` on.

        Raises `StoreUnavailableError` when the stream breaks; the caller resumes by calling again
        with the revision after the last batch it applied.
        """
        index, channel = self._pick()
        stub = rpc.WatchStub(channel)
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start_revision, progress_notify=True))
        stop = asyncio.Event()

        async def requests() -> AsyncIterator:
            yield create
            await stop.wait()

        call = stub.Watch(requests(), metadata=REQUIRE_LEADER)
        try:
            async for resp in call:
                if resp.compact_revision:
                    yield Compacted(resp.compact_revision)
                    return
                if resp.canceled:
                    self._failed(index, "watch_canceled")
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
            raise self._unavailable(index, exc, "watch stream") from None
        finally:
            stop.set()
            call.cancel()
        raise StoreUnavailableError(f"watch stream to {self.config.endpoints[index]} ended")


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

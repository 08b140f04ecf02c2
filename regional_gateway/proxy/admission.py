"""Which client connections the gateway takes at accept: a share of the connection cap per client,
and a penalty box for clients caught abusing a connection (the rules, apart from the sockets).

A client is one IPv4 address, or one IPv6 /64 (a host picks any address of its /64 at will, so
counting single IPv6 addresses would give it an unlimited share); an IPv4-mapped IPv6 address
counts as its IPv4 address (`client_key`). `Admission.check(key, now, total)` says why a new
connection of that client is refused (the cap, the share, the box), or None; `hold(key)` counts one of its connections from
accept (a TLS connection from the moment it is accepted, before its ClientHello) and
`release(key)` forgets it. The per-client share is `--max-connections-per-client`; by default a
quarter of the effective connection cap, at least 16 (`per_client_limit`), 0 = no share. The
mesh listener and `--trusted-peers` are exempt: the server never asks for them.

`PenaltyBox.offend(key, now, reason)` puts a client whose connection was closed for abuse (an
HTTP/2 GOAWAY ENHANCE_YOUR_CALM: rapid reset, no-op frame flood, replies left unread) in the box: its new connections are refused for a cool-down of `cooldown` seconds,
doubled by each repeat offence up to `cooldown_max`. Offences during a cool-down are the same
incident (the client's other connections, opened before it) and do not double it; a client clean
for `cooldown_max` after its cool-down ends starts over. The box remembers at most
`max_clients` clients, the least recent offender forgotten first. A well-behaved client never
offends: what it takes is in `h2_guard` (a client that cancels some of its calls earns its
resets back). A request head or body that times out, or a TLS ClientHello that never comes, is
not an offence: a client on a slow link is not hostile, and the share bounds what slowloris holds.

Pure: no sockets, the time is passed in. `_Collector` exports the limits in force and what the
box holds; refused connections are counted by the server in `geomesh_gateway_errors_total`
under the `Refusal` values.
"""

from __future__ import annotations

import enum
import socket
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from geomesh.cooldown import CooldownTable

PER_CLIENT_SHARE = 4  # by default a client may hold a quarter of the cap...
PER_CLIENT_FLOOR = 16  # ...but at least this many connections (browsers open 6 per host, NATs share)
DEFAULT_PENALTY = 1.0  # seconds, the first offence
DEFAULT_PENALTY_MAX = 60.0  # seconds, where the doubling stops
DEFAULT_PENALTY_CLIENTS = 10_000  # clients the box remembers
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_V6_HOST_PART = b"\0" * 8


class Refusal(enum.StrEnum):
    """Why a new connection was refused at accept (also its `cause` in the error counter and,
    on a plain listener, the `X-Geomesh-Error` of the 503 it gets)."""

    MAX_CONNECTIONS = "too-many-connections"  # the effective connection cap is reached
    PER_CLIENT = "client-over-share"  # its client holds --max-connections-per-client
    PENALISED = "client-penalised"  # its client is cooling down in the penalty box


def client_key(ip: str) -> str:
    """What connections are counted by: the IPv4 address, or the /64 of an IPv6 address
    (`2001:db8:1:2::/64`). Anything that is not an IP address is its own key."""
    if ":" not in ip:
        return ip
    address = ip.partition("%")[0]  # a link-local peer carries its scope
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        return ip
    if packed.startswith(_V4_MAPPED):
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + _V6_HOST_PART) + "/64"


def per_client_limit(configured: int | None, cap: int) -> int:
    """The connections one client may hold: `configured` (0 = no limit), or by default a quarter
    of the connection cap `cap`, at least `PER_CLIENT_FLOOR` (and never above the cap)."""
    if configured is not None:
        return configured
    return min(cap, max(PER_CLIENT_FLOOR, cap // PER_CLIENT_SHARE))


class PenaltyBox:
    """Clients refused for a while after a connection of theirs was closed for abuse (the cool-down
    rules are `geomesh.cooldown`'s; here a client is `client_key` and offences are counted by
    reason). An offence during a cool-down is the same incident and does not double it."""

    def __init__(self, cooldown: float = DEFAULT_PENALTY, cooldown_max: float = DEFAULT_PENALTY_MAX,
                 max_clients: int = DEFAULT_PENALTY_CLIENTS) -> None:
        self._table: CooldownTable[str] = CooldownTable(cooldown, cooldown_max, max_clients, same_incident=True)
        self.cooldown, self.cooldown_max, self.max_clients = cooldown, cooldown_max, max_clients
        self.offences: dict[str, int] = {}  # by reason

    @property
    def enabled(self) -> bool:
        return self._table.enabled

    @property
    def evictions(self) -> int:
        return self._table.evictions

    def offend(self, key: str, now: float, reason: str) -> float | None:
        """A connection of client `key` was closed for `reason` at `now`. Returns the cool-down
        that starts now, or None when none does (the box is off, or the client is cooling down
        already: the same incident)."""
        self.offences[reason] = self.offences.get(reason, 0) + 1
        return self._table.offend(key, now)

    def penalised(self, key: str, now: float) -> float:
        """Seconds `key` still has to cool down at `now` (0.0: not in the box)."""
        return self._table.remaining(key, now)

    def cooling(self, now: float) -> int:
        """Clients serving a cool-down at `now` (a scan: for the metrics, not the data path)."""
        return self._table.cooling(now)

    def __len__(self) -> int:
        return len(self._table)


class Admission:
    """The per-client connection counts of one server, its share rule and its penalty box."""

    def __init__(self, max_connections: int, per_client: int, penalty: PenaltyBox | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if per_client < 0:
            raise ValueError("per_client must be >= 0 (0 = no share)")
        self.max_connections = max_connections  # the effective cap (the server checks it)
        self.per_client = per_client
        self.penalty = penalty if penalty is not None else PenaltyBox(0.0)
        self.clock: Any = None  # () -> now, for the metrics' "cooling down" gauge
        self._held: dict[str, int] = {}
        _COLLECTOR.admissions.add(self)

    def check(self, key: str | None, now: float, total: int) -> Refusal | None:
        """Why a new connection of client `key` (None: exempt from the share and the box) is
        refused at `now` while the server holds `total` connections, or None (not counted yet:
        `hold` it once it is taken). The box first, then the cap, then the share."""
        if key is not None and self.penalty.penalised(key, now):
            return Refusal.PENALISED
        if total >= self.max_connections:
            return Refusal.MAX_CONNECTIONS
        if key is not None and self.per_client and self._held.get(key, 0) >= self.per_client:
            return Refusal.PER_CLIENT
        return None

    def hold(self, key: str) -> None:
        self._held[key] = self._held.get(key, 0) + 1

    def release(self, key: str) -> None:
        held = self._held.get(key, 0)
        if held <= 1:
            self._held.pop(key, None)
        else:
            self._held[key] = held - 1

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def clients(self) -> int:
        """Clients holding at least one connection."""
        return len(self._held)


class _Collector(Collector):
    """Exports, summed over the servers of the process:

    - `geomesh_gateway_connection_limit{scope}`: the effective cap (`total`, after the file
      descriptor limit) and the per-client share (`per_client`, 0 = none);
    - `geomesh_gateway_penalty_clients{state}`: clients in the penalty box, `cooling` (refused
      now) or `remembered` (all, the cooling ones included: a repeat offence doubles);
    - `geomesh_gateway_penalties_total{reason}`: connections closed for abuse that put (or kept)
      their client in the box, by reason;
    - `geomesh_gateway_penalty_evictions_total`: clients forgotten to keep the box within its size.
    """

    def __init__(self) -> None:
        self.admissions: weakref.WeakSet[Admission] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        limit = GaugeMetricFamily("geomesh_gateway_connection_limit",
                                  "Client connections allowed: in all (after the file descriptor limit) and per client",
                                  labels=["scope"])
        boxed = GaugeMetricFamily("geomesh_gateway_penalty_clients", "Clients in the penalty box",
                                  labels=["state"])
        offences = CounterMetricFamily("geomesh_gateway_penalties",
                                       "Connections closed for abuse that put their client in the penalty box",
                                       labels=["reason"])
        evicted = CounterMetricFamily("geomesh_gateway_penalty_evictions",
                                      "Clients forgotten to keep the penalty box within its size")
        total = per_client = cooling = remembered = evictions = 0
        by_reason: dict[str, int] = {}
        for adm in list(self.admissions):
            total += adm.max_connections
            per_client += adm.per_client
            box = adm.penalty
            remembered += len(box)
            if adm.clock is not None:
                cooling += box.cooling(adm.clock())
            evictions += box.evictions
            for reason, n in list(box.offences.items()):
                by_reason[reason] = by_reason.get(reason, 0) + n
        limit.add_metric(["total"], total)
        limit.add_metric(["per_client"], per_client)
        boxed.add_metric(["cooling"], cooling)
        boxed.add_metric(["remembered"], remembered)
        for reason, n in sorted(by_reason.items()):
            offences.add_metric([reason], n)
        evicted.add_metric([], evictions)
        yield from (limit, boxed, offences, evicted)


_COLLECTOR = _Collector()
REGISTRY.register(_COLLECTOR)

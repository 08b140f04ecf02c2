"""Which TCP connections a process accepts: a cap on all of them, a share of it per client, and a
penalty box for clients that were caught abusing the transport.

`TcpAdmission.admit(client, now)` decides when a connection arrives and counts it;
`release(client)` forgets it when it closes. A connection is refused when its client sits in the
penalty box (`Refusal.PENALISED`), when the process already holds `max_connections`
(`Refusal.MAX_CONNECTIONS`) or when its client already holds `max_per_client`
(`Refusal.PER_CLIENT`), so one client cannot take every slot and cut everyone else off TCP (the
transport truncated answers and RRL slips send resolvers to). A client is one IPv4 address (TCP
cannot be spoofed, and resolvers behind one NAT share an address) or one IPv6 /56 (the usual
end-site assignment: a host can pick any address of its prefix, so counting single IPv6 addresses
would give it an unlimited share). IPv4-mapped IPv6 addresses count as IPv4. `PenaltyBox.offend`
puts a client whose connection was closed for abuse (`geodns.tcp`: a message no query can be) in
the box for a cool-down that doubles with each repeat offence, from `cooldown` up to
`cooldown_max`; a client that stays clean for `cooldown_max` after its cool-down ends starts over.
The box remembers at most `max_clients` clients (the least recent offender is forgotten first).
Pure: no sockets; the time is passed in. `TcpAbuseCollector` exports what the box counted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from geomesh.cooldown import CooldownTable

CLIENT_IPV6_PREFIX_OCTETS = 7  # /56
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"

DEFAULT_ABUSE_COOLDOWN = 1.0  # seconds, the first offence
DEFAULT_ABUSE_COOLDOWN_MAX = 60.0  # seconds, where doubling stops
DEFAULT_PENALTY_CLIENTS = 10_000  # clients the box remembers


class Refusal(enum.StrEnum):
    MAX_CONNECTIONS = "max_connections"
    PER_CLIENT = "per_client"
    PENALISED = "penalised"


class Abuse(enum.StrEnum):
    """Why a TCP connection was closed for abuse: a message no query can be (see `geodns.tcp`)."""

    OVERSIZE = "oversize"  # longer than any query (wire.MAX_QUERY_OCTETS)
    RECORDS = "records"  # a query with answer or authority records
    ADDITIONAL = "additional"  # a query with more than wire.MAX_ADDITIONAL additional records


def default_per_client(max_connections: int) -> int:
    """The share of one client when none is configured: a tenth of the slots, at least one."""
    return max(1, max_connections // 10)


def client_key(client: bytes) -> bytes:
    """What connections are counted by: the IPv4 address, or the /56 of an IPv6 address."""
    if len(client) == 16:
        if client.startswith(_V4_MAPPED):
            return client[12:]
        return client[:CLIENT_IPV6_PREFIX_OCTETS]
    return client


class PenaltyBox:
    """Clients refused for a while after a connection of theirs was closed for abuse (the cool-down
    rules are `geomesh.cooldown`'s; here a client is `client_key` and offences are counted by
    `Abuse`). Offences during a cool-down double it: each is another connection closed for abuse."""

    def __init__(self, cooldown: float = DEFAULT_ABUSE_COOLDOWN, cooldown_max: float = DEFAULT_ABUSE_COOLDOWN_MAX,
                 max_clients: int = DEFAULT_PENALTY_CLIENTS) -> None:
        self._table: CooldownTable[bytes] = CooldownTable(cooldown, cooldown_max, max_clients, same_incident=False)
        self.closed = dict.fromkeys(Abuse, 0)  # connections closed for abuse, by reason

    @property
    def enabled(self) -> bool:
        return self._table.enabled

    @property
    def evictions(self) -> int:
        return self._table.evictions

    def offend(self, client: bytes, now: float, abuse: Abuse) -> float:
        """A connection of `client` was closed for `abuse` at `now`: the cool-down it now serves."""
        self.closed[abuse] += 1
        return self._table.offend(client_key(client), now) or 0.0

    def penalised(self, client: bytes, now: float) -> bool:
        """Whether `client` is serving a cool-down at `now`."""
        return self._table.remaining(client_key(client), now) > 0

    def __len__(self) -> int:
        return len(self._table)

    def snapshot(self) -> dict[str, Any]:
        """Plain, picklable totals for the metrics (summed across workers by `merge_snapshots`)."""
        return {"closed": {abuse.value: n for abuse, n in self.closed.items()}, "clients": len(self._table),
                "evictions": self.evictions}


class TcpAdmission:
    def __init__(self, max_connections: int, max_per_client: int | None = None,
                 penalty: PenaltyBox | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        per_client = default_per_client(max_connections) if max_per_client is None else max_per_client
        if not 1 <= per_client <= max_connections:
            raise ValueError(f"max_per_client {per_client} is outside 1-{max_connections}")
        self.max_connections = max_connections
        self.max_per_client = per_client
        self.penalty = penalty if penalty is not None else PenaltyBox(0.0)
        self.total = 0
        self._per_client: dict[bytes, int] = {}

    def admit(self, client: bytes, now: float = 0.0) -> Refusal | None:
        """None (and the connection is counted) or why it is refused at `now`."""
        if self.penalty.penalised(client, now):
            return Refusal.PENALISED
        if self.total >= self.max_connections:
            return Refusal.MAX_CONNECTIONS
        key = client_key(client)
        held = self._per_client.get(key, 0)
        if held >= self.max_per_client:
            return Refusal.PER_CLIENT
        self._per_client[key] = held + 1
        self.total += 1
        return None

    def release(self, client: bytes) -> None:
        """A connection `admit` counted has closed."""
        key = client_key(client)
        held = self._per_client.get(key, 0)
        if held <= 0:
            return
        if held == 1:
            del self._per_client[key]
        else:
            self._per_client[key] = held - 1
        self.total -= 1

    def held(self, client: bytes) -> int:
        return self._per_client.get(client_key(client), 0)


# -- metrics ----------------------------------------------------------------------------------


def merge_snapshots(snapshots: Iterable[dict[str, Any]], live: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """The sum of several processes' `PenaltyBox.snapshot()`s; the `clients` gauge from `live`
    only (a dead worker's box is gone)."""
    out: dict[str, Any] = {"closed": dict.fromkeys((a.value for a in Abuse), 0), "clients": 0, "evictions": 0}
    for snap in snapshots:
        for reason, n in snap.get("closed", {}).items():
            out["closed"][reason] = out["closed"].get(reason, 0) + n
        out["evictions"] += snap.get("evictions", 0)
    out["clients"] = sum(snap.get("clients", 0) for snap in live)
    return out


class TcpAbuseCollector(Collector):
    """Exports a `PenaltyBox` snapshot (or the workers' merged ones) at scrape time:

    - `geodns_tcp_abuse_closed_total{reason}` TCP connections closed after a message no query
      can be (`oversize`, `records`, `additional`); their reconnections are counted in
      `geodns_tcp_refused_total{reason="penalised"}`
    - `geodns_tcp_penalty_clients` clients in the penalty box (serving or remembered for doubling)
    - `geodns_tcp_penalty_evictions_total` clients forgotten to keep the box within its size
    """

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        closed = CounterMetricFamily("geodns_tcp_abuse_closed", "TCP connections closed after a message no query "
                                     "can be (FORMERR, then close), by reason", labels=["reason"])
        for reason, n in sorted(snap.get("closed", {}).items()):
            closed.add_metric([reason], n)
        yield closed
        yield GaugeMetricFamily("geodns_tcp_penalty_clients", "clients in the TCP penalty box (cooling down, or "
                                "remembered so that a repeat offence doubles the cool-down)",
                                value=snap.get("clients", 0))
        yield CounterMetricFamily("geodns_tcp_penalty_evictions", "clients forgotten to keep the penalty box "
                                  "within --tcp-abuse-clients", value=snap.get("evictions", 0))

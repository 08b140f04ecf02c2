"""Which TCP connections a process accepts: a cap on all of them and a share of it per client.

`TcpAdmission.admit(client)` decides when a connection arrives and counts it; `release(client)`
forgets it when it closes. A connection is refused when the process already holds
`max_connections` (`Refusal.MAX_CONNECTIONS`) or when its client already holds `max_per_client`
(`Refusal.PER_CLIENT`), so one client cannot take every slot and cut everyone else off TCP (the
transport truncated answers and RRL slips send resolvers to). A client is one IPv4 address (TCP
cannot be spoofed, and resolvers behind one NAT share an address) or one IPv6 /56 (the usual
end-site assignment: a host can pick any address of its prefix, so counting single IPv6 addresses
would give it an unlimited share). IPv4-mapped IPv6 addresses count as IPv4. Pure: no sockets,
no clock.
"""

from __future__ import annotations

import enum

CLIENT_IPV6_PREFIX_OCTETS = 7  # /56
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


class Refusal(enum.StrEnum):
    MAX_CONNECTIONS = "max_connections"
    PER_CLIENT = "per_client"


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


class TcpAdmission:
    def __init__(self, max_connections: int, max_per_client: int | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        per_client = default_per_client(max_connections) if max_per_client is None else max_per_client
        if not 1 <= per_client <= max_connections:
            raise ValueError(f"max_per_client {per_client} is outside 1-{max_connections}")
        self.max_connections = max_connections
        self.max_per_client = per_client
        self.total = 0
        self._per_client: dict[bytes, int] = {}

    def admit(self, client: bytes) -> Refusal | None:
        """None (and the connection is counted) or why it is refused."""
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

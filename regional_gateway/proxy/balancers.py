"""Load-balancing policies: which backend of an app serves the next request.

Pure decision objects over the app's backend states (anything with `key: str`,
`inflight: int` and `available: bool`): the caller passes the currently available backends and
the client's address and gets one backend back, or None when none is available. Policies keep
only their own small state (a round-robin cursor, a hash ring); in-flight counts and health live
in the backend states the caller owns.

- `RoundRobin`: each available backend in turn.
- `LeastConnections`: the backend with the fewest requests in flight; ties go round robin, so
  equal backends share the load instead of the first one taking everything.
- `IpHash`: consistent hashing of the client address (see `consistent_hash.HashRing`); an
  unavailable backend's clients spill over clockwise, everyone else stays put.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from geomesh.model import LbPolicy
from regional_gateway.proxy.consistent_hash import HashRing


class BackendState(Protocol):
    key: str
    inflight: int
    available: bool


B = TypeVar("B", bound=BackendState)


class RoundRobin:
    __slots__ = ("_next",)

    def __init__(self, backends: Sequence[BackendState] = ()) -> None:
        self._next = 0

    def pick(self, available: Sequence[B], client: bytes) -> B | None:
        n = len(available)
        if not n:
            return None
        i = self._next
        self._next = i + 1
        return available[i % n]


class LeastConnections:
    __slots__ = ("_next",)

    def __init__(self, backends: Sequence[BackendState] = ()) -> None:
        self._next = 0

    def pick(self, available: Sequence[B], client: bytes) -> B | None:
        n = len(available)
        if not n:
            return None
        start = self._next % n
        self._next = start + 1
        best = available[start]
        low = best.inflight
        if low:
            for i in range(1, n):
                b = available[(start + i) % n]
                if b.inflight < low:
                    best, low = b, b.inflight
                    if not low:
                        break
        return best


def _is_available(b: BackendState) -> bool:
    return b.available


class IpHash:
    __slots__ = ("_ring",)

    def __init__(self, backends: Sequence[BackendState] = ()) -> None:
        self._ring: HashRing[BackendState] = HashRing(backends, lambda b: b.key)

    def pick(self, available: Sequence[B], client: bytes) -> B | None:
        if not available:
            return None
        owner = self._ring.primary(client)
        if owner is not None and owner.available:  # the common case: the client's own backend is up
            return owner  # type: ignore[return-value]
        return self._ring.lookup(client, _is_available)  # type: ignore[return-value]


Balancer = RoundRobin | LeastConnections | IpHash
_POLICIES = {LbPolicy.ROUND_ROBIN: RoundRobin, LbPolicy.LEAST_CONNECTIONS: LeastConnections,
             LbPolicy.IP_HASH: IpHash}


def make_balancer(policy: LbPolicy, backends: Sequence[BackendState]) -> Balancer:
    return _POLICIES[policy](backends)

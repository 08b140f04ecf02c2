"""How many custom-domain TXT look-ups the gateway sends: a token bucket per client and one for all.

A look-up costs the resolver (and whoever runs the customer's DNS) work, and any client can ask
for any host name, so look-ups are budgeted: each client (the admission key: an IPv4 address or
an IPv6 /64, `admission.client_key`) has a bucket of `client_burst` tokens refilled at
`client_rate` per second, and all clients together one of `burst` refilled at `rate`. A look-up
takes one token from both, or from neither: a client over its share is refused (`CLIENT`, the
request gets 429) without spending the shared budget, and when the shared bucket is empty every
client is refused (`GLOBAL`, 503). Answers served from the cache and requests that join a look-up
already on its way cost nothing. Clients exempt from admission (the mesh, trusted peers: key None)
spend only the shared bucket. At most `max_clients` client buckets are kept; the least recently
used is forgotten first (it comes back full, which the shared bucket bounds).

Pure: no I/O; the time is passed in.
"""

from __future__ import annotations

import enum
from collections import OrderedDict


class Refusal(enum.StrEnum):
    CLIENT = "client"  # this client's look-ups are over its rate
    GLOBAL = "global"  # the gateway's look-ups are over their rate


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at

    def refill(self, now: float, rate: float, burst: float) -> float:
        if now > self.at:
            self.tokens = min(burst, self.tokens + (now - self.at) * rate)
            self.at = now
        return self.tokens


class LookupBudget:
    def __init__(self, client_rate: float, client_burst: int, rate: float, burst: int,
                 max_clients: int = 10_000) -> None:
        self.client_rate = client_rate
        self.client_burst = client_burst
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.shared: _Bucket | None = None
        self.clients: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, client: str | None, now: float) -> Refusal | None:
        """Spend a look-up for `client` (None: exempt from the per-client rate) at `now`, or say why not."""
        bucket = None
        if client is not None:
            bucket = self.clients.get(client)
            if bucket is None:
                bucket = _Bucket(self.client_burst, now)
                self.clients[client] = bucket
                if len(self.clients) > self.max_clients:
                    self.clients.popitem(last=False)
            else:
                self.clients.move_to_end(client)
            if bucket.refill(now, self.client_rate, self.client_burst) < 1:
                return Refusal.CLIENT
        shared = self.shared
        if shared is None:
            shared = self.shared = _Bucket(self.burst, now)
        if shared.refill(now, self.rate, self.burst) < 1:
            return Refusal.GLOBAL
        shared.tokens -= 1
        if bucket is not None:
            bucket.tokens -= 1
        return None

"""A penalty box's core: clients refused for a cool-down that doubles with each repeat offence.

Both the GeoDNS TCP transport and the gateway's listeners put a client whose connection was
closed for abuse in a box (`geodns.tcp_admission.PenaltyBox`, `regional_gateway.proxy.admission
.PenaltyBox`); what differs is what a client is (their keys), what an offence is and how it is
counted. This is what they share. `CooldownTable.offend(key, now)` starts a cool-down of `cooldown`
seconds, doubled for each offence while the previous one is recent (its cool-down ended less than
`cooldown_max` ago) up to `cooldown_max`; a client clean for `cooldown_max` after its cool-down
starts over. With `same_incident=True` an offence during a running cool-down is the same incident
(the client's other connections, opened before it) and changes nothing. The table remembers at
most `max_clients` clients, the least recent offender forgotten first (`evictions` counts them).
Pure: no I/O, the time is passed in; `cooldown = 0` turns the box off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Penalty:
    until: float  # refused before this time
    cooldown: float  # the cool-down that ends at `until`; the next offence after it doubles it


class CooldownTable(Generic[K]):
    def __init__(self, cooldown: float, cooldown_max: float, max_clients: int, *, same_incident: bool) -> None:
        if cooldown < 0:
            raise ValueError("cooldown must be >= 0 (0 disables the penalty box)")
        if cooldown and cooldown_max < cooldown:
            raise ValueError(f"cooldown_max {cooldown_max} is below cooldown {cooldown}")
        if max_clients < 1:
            raise ValueError("max_clients must be >= 1")
        self.cooldown = cooldown
        self.cooldown_max = cooldown_max
        self.max_clients = max_clients
        self.same_incident = same_incident
        self.evictions = 0
        self._clients: OrderedDict[K, _Penalty] = OrderedDict()  # least recent offender first

    @property
    def enabled(self) -> bool:
        return self.cooldown > 0

    def offend(self, key: K, now: float) -> float | None:
        """`key` offended at `now`: the cool-down that starts now, or None when none does (the box
        is off, or `same_incident` and the client is cooling down already)."""
        if not self.enabled:
            return None
        last = self._clients.pop(key, None)
        if last is not None and self.same_incident and now < last.until:
            self._clients[key] = last
            return None
        if last is not None and now < last.until + self.cooldown_max:
            cooldown = min(max(last.cooldown * 2, self.cooldown), self.cooldown_max)
        else:
            cooldown = self.cooldown
        self._clients[key] = _Penalty(now + cooldown, cooldown)
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
            self.evictions += 1
        return cooldown

    def remaining(self, key: K, now: float) -> float:
        """Seconds `key` still has to cool down at `now` (0.0: not in the box)."""
        if not self._clients:
            return 0.0
        entry = self._clients.get(key)
        if entry is None or now >= entry.until:
            return 0.0
        return entry.until - now

    def cooling(self, now: float) -> int:
        """Clients serving a cool-down at `now` (a scan: for the metrics, not the data path)."""
        return sum(1 for p in list(self._clients.values()) if now < p.until)

    def __len__(self) -> int:
        return len(self._clients)

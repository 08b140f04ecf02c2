"""Response rate limiting (RRL): a budget of responses per second per client network.

Clients are grouped by network (/24 for IPv4, /56 for IPv6 by default), because a reflection
attack spoofs many addresses of one victim network. Each network earns `rate` responses per
second up to a burst of one second's worth; past that it runs into debt, bounded by `window`
seconds of budget, so a network that keeps flooding stays limited until it has been quiet for
up to `window` seconds. A limited response is dropped, except every `slip`-th one, which is sent
as a truncated reply (TC set, no records): a real resolver behind a spoofed address retries over
TCP, which is never rate limited. `slip = 0` drops all limited responses. Pure: the caller passes
the clock. Off unless `rate > 0`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from geomesh.errors import ValidationError


class Action(enum.IntEnum):
    SEND = 0
    SLIP = 1  # send a truncated reply instead
    DROP = 2


@dataclass(frozen=True, slots=True)
class RrlConfig:
    rate: float = 0.0  # responses per second per client network; 0 = off
    window: float = 15.0
    slip: int = 2
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    max_tracked: int = 100_000

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValidationError("rrl_rate", f"{self.rate} is negative")
        if not 1 <= self.window <= 3600:
            raise ValidationError("rrl_window", f"{self.window} is outside 1-3600 seconds")
        if not 0 <= self.slip <= 10:
            raise ValidationError("rrl_slip", f"{self.slip} is outside 0-10")
        if not 8 <= self.ipv4_prefix <= 32:
            raise ValidationError("rrl_ipv4_prefix", f"{self.ipv4_prefix} is outside 8-32")
        if not 16 <= self.ipv6_prefix <= 128:
            raise ValidationError("rrl_ipv6_prefix", f"{self.ipv6_prefix} is outside 16-128")

    @property
    def enabled(self) -> bool:
        return self.rate > 0


class RateLimiter:
    def __init__(self, config: RrlConfig) -> None:
        self.config = config
        self._table: dict[bytes, list[float]] = {}  # network -> [balance, last time, limited count]
        self._v4_bytes = (config.ipv4_prefix + 7) // 8
        self._v6_bytes = (config.ipv6_prefix + 7) // 8
        self._v4_mask = (0xFF << (8 - config.ipv4_prefix % 8)) & 0xFF if config.ipv4_prefix % 8 else 0xFF
        self._v6_mask = (0xFF << (8 - config.ipv6_prefix % 8)) & 0xFF if config.ipv6_prefix % 8 else 0xFF

    def network(self, client: bytes) -> bytes:
        """The key of a client's network (the address cut to the configured prefix)."""
        if len(client) == 4:
            n, m = self._v4_bytes, self._v4_mask
        else:
            n, m = self._v6_bytes, self._v6_mask
        head = client[:n]
        if m != 0xFF:
            head = head[:-1] + bytes([head[-1] & m])
        return head

    def check(self, client: bytes, now: float) -> Action:
        cfg = self.config
        key = self.network(client)
        state = self._table.get(key)
        if state is None:
            if len(self._table) >= cfg.max_tracked:
                self._sweep(now)
            state = self._table[key] = [cfg.rate, now, 0.0]
        else:
            state[0] = min(cfg.rate, state[0] + (now - state[1]) * cfg.rate)
            state[1] = now
        state[0] -= 1.0
        if state[0] >= 0.0:
            return Action.SEND
        state[0] = max(state[0], -cfg.rate * cfg.window)
        if cfg.slip:
            state[2] += 1
            if state[2] % cfg.slip == 0:
                return Action.SLIP
        return Action.DROP

    def _sweep(self, now: float) -> None:
        """Forget networks that have been quiet for a whole window (all of them if none is)."""
        horizon = now - self.config.window
        stale = [k for k, st in self._table.items() if st[1] < horizon]
        for k in stale:
            del self._table[k]
        if len(self._table) >= self.config.max_tracked:
            self._table.clear()

    def __len__(self) -> int:
        return len(self._table)

"""Backend health: one small state machine per backend, fed by probes and by live traffic.

Pure: events with a timestamp in (`probe`, `connect_failed`, `connected`, `response`, `expire`),
the availability out. Two independent verdicts make a backend unavailable:

- active probes (TCP connect or HTTP GET, run by `prober.py`): `fall` consecutive failures mark
  an up backend *down*; `rise` consecutive successes bring it back *up*;
- passive ejection from live traffic: `eject_connect_failures` consecutive connect failures or
  resets, or `eject_5xx` consecutive 5xx responses, *eject* the backend for `eject_seconds`;
  when that time has passed (`expire`), it is re-admitted and the counters start again.

A backend starts up (optimistic: a new instance gets traffic at once; the first failure ejects
it). With `check = "none"` only passive ejection applies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from regional_gateway.proxy.routes import HealthCheck


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"  # active probes failed
    EJECTED = "ejected"  # passive ejection, until `ejected_until`


@dataclass(slots=True)
class HealthState:
    check: HealthCheck
    probed_up: bool = True
    ok_streak: int = 0
    fail_streak: int = 0
    connect_failures: int = 0
    errors_5xx: int = 0
    ejected_until: float = 0.0
    reason: str = ""

    @property
    def state(self) -> Health:
        if not self.probed_up:
            return Health.DOWN
        if self.ejected_until:
            return Health.EJECTED
        return Health.UP

    @property
    def available(self) -> bool:
        return self.probed_up and not self.ejected_until

    def probe(self, ok: bool, now: float, detail: str = "") -> bool:
        """Record one probe result; True if availability changed."""
        before = self.available
        if ok:
            self.fail_streak = 0
            self.ok_streak += 1
            if not self.probed_up and self.ok_streak >= self.check.rise:
                self.probed_up = True
                self.ejected_until = 0.0
                self.connect_failures = self.errors_5xx = 0
                self.reason = ""
        else:
            self.ok_streak = 0
            self.fail_streak += 1
            if self.probed_up and self.fail_streak >= self.check.fall:
                self.probed_up = False
                self.reason = f"probe failed {self.fail_streak} times: {detail}" if detail else "probe failed"
        return before != self.available

    def connect_failed(self, now: float, detail: str = "") -> bool:
        """A connect failure or a reset before any response byte; True if availability changed."""
        self.connect_failures += 1
        limit = self.check.eject_connect_failures
        if limit and self.connect_failures >= limit and self.available:
            self.ejected_until = now + self.check.eject_seconds
            self.reason = f"{self.connect_failures} connect failure(s): {detail}" if detail else "connect failures"
            return True
        return False

    def connected(self) -> None:
        self.connect_failures = 0

    def response(self, status: int, now: float) -> bool:
        """A response status from live traffic; True if availability changed."""
        if status < 500:
            self.errors_5xx = 0
            return False
        self.errors_5xx += 1
        limit = self.check.eject_5xx
        if limit and self.errors_5xx >= limit and self.available:
            self.ejected_until = now + self.check.eject_seconds
            self.reason = f"{self.errors_5xx} consecutive 5xx responses"
            return True
        return False

    def expire(self, now: float) -> bool:
        """Re-admit after a passive ejection ran out; True if availability changed."""
        if self.ejected_until and now >= self.ejected_until:
            before = self.available
            self.ejected_until = 0.0
            self.connect_failures = self.errors_5xx = 0
            return before != self.available
        return False

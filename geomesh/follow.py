"""Following a coordinator stream: the reconnect loop and its backoff, shared by every consumer.

The DNS server's routing feed (`geodns.feed`) and the gateway's session (`regional_gateway.agent`)
each keep one stream open to a coordinator and, when it breaks, open it again on the next replica
after a pause. This module holds that loop once. `follow(attempt, ...)` calls `attempt(target)` on
the current target of a `geomesh.channel.Targets`; the attempt runs one stream to its end (and
resumes from whatever revision its owner last applied) and says whether anything arrived on it. An
attempt that got something, or lived longer than `healthy_after` seconds, was a working stream: the
backoff starts over. Then the loop moves to the next target (a single target stays put), asks the
`Backoff` for the pause (its delay times a jitter factor drawn in the caller's own range, the delay
then multiplied by `factor` up to `max`), tells the caller through `on_retry` (where logs and
counters stay the caller's own) and sleeps. `Backoff` is a frozen value with the random source
passed in, so it is table-tested; the loop takes its clock, sleep and random for the same reason.
A caller whose attempt ends by other means than returning (cancellation, an error it does not
catch) ends the loop: what counts as retryable is the attempt's decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from geomesh.channel import Targets
from geomesh.errors import ValidationError

HEALTHY_AFTER = 5.0  # seconds: a stream that lived this long was working, even if nothing came on it


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: the pause before attempt n+1 is `delay * j`, j drawn
    uniformly from `jitter` (low, high); after it the delay is `min(max, delay * factor)`.
    `delay` starts at (and `reset()` returns to) `initial`."""

    initial: float
    max: float
    factor: float = 2.0
    jitter: tuple[float, float] = (0.5, 1.0)
    delay: float = 0.0  # the delay before jitter; 0 means `initial`

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ValidationError("initial", f"must be > 0 seconds, got {self.initial}")
        if not self.max >= self.initial:
            raise ValidationError("max", f"must be >= initial ({self.initial}), got {self.max}")
        if not self.factor >= 1:
            raise ValidationError("factor", f"must be >= 1, got {self.factor}")
        if not (isinstance(self.jitter, tuple) and len(self.jitter) == 2 and 0 < self.jitter[0] <= self.jitter[1]):
            raise ValidationError("jitter", f"must be (low, high) with 0 < low <= high, got {self.jitter}")
        if self.delay == 0.0:
            object.__setattr__(self, "delay", self.initial)
        elif not self.initial <= self.delay <= self.max:
            raise ValidationError("delay", f"must be between initial and max, got {self.delay}")

    def next(self, random: Callable[[], float]) -> tuple[float, Backoff]:
        """The pause to sleep now (`random()` in [0, 1) picks the jitter) and the backoff after it."""
        low, high = self.jitter
        pause = self.delay * (low + (high - low) * random())
        return pause, dataclasses.replace(self, delay=min(self.max, self.delay * self.factor))

    def reset(self) -> Backoff:
        """The backoff after a working stream: the delay back at `initial`."""
        return dataclasses.replace(self, delay=self.initial)


@dataclass(frozen=True, slots=True)
class Retry:
    """What `follow` tells the caller after an attempt ended, before it sleeps."""

    target: str  # the target the attempt ran on (the loop has moved on to the next one)
    healthy: bool  # it got something or lived longer than healthy_after: the backoff started over
    pause: float  # seconds until the next attempt


async def follow(attempt: Callable[[str], Awaitable[bool]], *, targets: Targets, backoff: Backoff,
                 on_retry: Callable[[Retry], None], healthy_after: float = HEALTHY_AFTER,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 random: Callable[[], float] = _random.random) -> NoReturn:
    """Run `attempt` on the current target, then again after a pause, until cancelled (or until
    an attempt or `on_retry` raises)."""
    while True:
        target = targets.current
        started = clock()
        got_any = await attempt(target)
        healthy = got_any or clock() - started > healthy_after
        if healthy:
            backoff = backoff.reset()
        targets.advance()
        pause, backoff = backoff.next(random)
        on_retry(Retry(target, healthy, pause))
        await sleep(pause)

"""When a failed try of an exchange may go again: one retry policy per exchange kind, as values.

An exchange (an HTTP/1.1 request, an HTTP/2 stream, a tunnel's connect) is tried at most
`RetryPolicy.max_attempts` times, each on a target the earlier tries did not fail on. Whether a
failure allows another try is `may_retry(policy, attempts, failure, ...)`, a pure function; the
three kinds differ only in their policy, so every difference is a parameter here:

| failure | HTTP/1.1 | HTTP/2 | tunnel |
|---|---|---|---|
| `CONNECT`: no connection, or the request never went out | yes, unless body bytes already came and more are coming | yes | yes |
| `STALE_POOLED`: a pooled connection closed before answering | yes, without a request body | — (no pool) | — |
| `RESET_BEFORE_ANSWER`: a fresh connection closed before answering | idempotent methods without a body | no (the stream was sent) | — |
| `REFUSED_STREAM`: the backend did not process the stream (RFC 9113 8.7) | — | yes | — |

A body that was (partly) sent cannot be replayed: the gateway streams bodies and never keeps them.

One try of an exchange on a backend has one lifecycle for every kind (`Try`): `begin` counts it in
the backend's `inflight` and as an attempt, `end` un-counts it exactly once whatever path ends it,
`failed` ends it and says whether `may_retry` allows another try, and `connect_failed` gives the
backend's health its verdict. A tunnel's connect tries share the policy and the verdict; a tunnel
is not counted in `inflight`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

MAX_ATTEMPTS = 3  # tries of one exchange, for every kind


class Failure(enum.Enum):
    CONNECT = "connect"
    STALE_POOLED = "stale-pooled"
    RESET_BEFORE_ANSWER = "reset-before-answer"
    REFUSED_STREAM = "refused-stream"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retried: frozenset[Failure]
    max_attempts: int = MAX_ATTEMPTS
    idempotent_only: frozenset[Failure] = frozenset()  # retried only for idempotent requests


HTTP1 = RetryPolicy(frozenset((Failure.CONNECT, Failure.STALE_POOLED, Failure.RESET_BEFORE_ANSWER)),
                    idempotent_only=frozenset((Failure.RESET_BEFORE_ANSWER,)))
HTTP2 = RetryPolicy(frozenset((Failure.CONNECT, Failure.REFUSED_STREAM)))
TUNNEL = RetryPolicy(frozenset((Failure.CONNECT,)))


def may_retry(policy: RetryPolicy, attempts: int, failure: Failure, *, idempotent: bool = True,
              body_sent: bool = False) -> bool:
    """Whether an exchange tried `attempts` times may go again after `failure`. `body_sent`: body
    bytes went out (or are on their way) that cannot be sent again."""
    if attempts >= policy.max_attempts or body_sent or failure not in policy.retried:
        return False
    return idempotent or failure not in policy.idempotent_only


# ---------------------------------------------------------------- one try's lifecycle

class Try(Protocol):
    """What is tried on a backend (an `exchange.Exchange`, an `h2_upstream.Stream`): the backend of
    its current try, whether that try is counted in the backend's `inflight`, and how many tries
    it had."""

    backend: Any
    counted: bool
    attempts: int


class HealthHost(Protocol):
    now: float

    def health_changed(self, rt: Any) -> None: ...


def begin(t: Try, rt: Any) -> None:
    """A try of `t` starts on `rt`: counted in `rt.inflight` until `end`; one more attempt.
    (`http1_exchanges._send` inlines exactly these four lines: the measured hot path.)"""
    t.backend = rt
    rt.inflight += 1
    t.counted = True
    t.attempts += 1


def end(t: Try) -> None:
    """The current try of `t` is over, whatever ended it: un-counted exactly once (a second call,
    or a call before any `begin`, changes nothing)."""
    if t.counted:
        t.counted = False
        t.backend.inflight -= 1


def failed(t: Try, policy: RetryPolicy, failure: Failure, *, idempotent: bool = True,
           body_sent: bool = False) -> bool:
    """The current try of `t` failed with `failure`: it ends, and the answer is whether `policy`
    allows another try (`may_retry`)."""
    end(t)
    return may_retry(policy, t.attempts, failure, idempotent=idempotent, body_sent=body_sent)


def connect_failed(host: HealthHost, rt: Any, why: str) -> None:
    """The health verdict of a failed connection to `rt` (`health.connect_failed`): `host` hears
    when it changes `rt`'s availability."""
    if rt.health.connect_failed(host.now, why):
        host.health_changed(rt)

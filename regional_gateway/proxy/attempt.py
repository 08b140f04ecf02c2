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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

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

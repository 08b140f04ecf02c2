"""Table tests of `attempt.may_retry`: which failed tries of an exchange may go again, per kind."""

from __future__ import annotations

import pytest

from regional_gateway.proxy.attempt import HTTP1, HTTP2, MAX_ATTEMPTS, TUNNEL, Failure, RetryPolicy, may_retry

C, STALE, RESET, REFUSED = Failure.CONNECT, Failure.STALE_POOLED, Failure.RESET_BEFORE_ANSWER, Failure.REFUSED_STREAM


@pytest.mark.parametrize("policy,attempts,failure,options,want", [
    # HTTP/1.1: connect failures, stale pooled connections, resets of idempotent requests without a body
    (HTTP1, 1, C, {}, True),
    (HTTP1, 2, C, {}, True),
    (HTTP1, MAX_ATTEMPTS, C, {}, False),  # three tries at most
    (HTTP1, 1, C, {"body_sent": True}, False),  # body bytes came and more are coming: cannot be replayed
    (HTTP1, 1, STALE, {"idempotent": False}, True),  # a POST on a connection the backend had closed: never sent
    (HTTP1, 1, STALE, {"body_sent": True}, False),
    (HTTP1, 1, RESET, {}, True),
    (HTTP1, 1, RESET, {"idempotent": False}, False),  # a POST may have been processed
    (HTTP1, 1, RESET, {"body_sent": True}, False),
    (HTTP1, 1, REFUSED, {}, False),
    # HTTP/2: streams never sent, and streams the backend refused unprocessed
    (HTTP2, 1, C, {}, True),
    (HTTP2, 2, REFUSED, {}, True),
    (HTTP2, MAX_ATTEMPTS, REFUSED, {}, False),
    (HTTP2, 1, RESET, {}, False),  # sent: the backend may have acted on it
    (HTTP2, 1, STALE, {}, False),
    # tunnels: connect failures only
    (TUNNEL, 1, C, {}, True),
    (TUNNEL, MAX_ATTEMPTS, C, {}, False),
    (TUNNEL, 1, RESET, {}, False),
    # a policy is a value: another limit is a parameter
    (RetryPolicy(frozenset((C,)), max_attempts=5), 4, C, {}, True),
])
def test_may_retry(policy: RetryPolicy, attempts: int, failure: Failure, options: dict, want: bool) -> None:
    assert may_retry(policy, attempts, failure, **options) is want

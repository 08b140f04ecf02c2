"""Table tests of `attempt`: which failed tries of an exchange may go again, per kind (`may_retry`),
and one try's lifecycle (`begin`/`end`/`failed`/`connect_failed`) on real exchanges, HTTP/2 streams
and backends: a backend's `inflight` (what least-connections balances on) counts each try once."""

from __future__ import annotations

import pytest

from regional_gateway.proxy.attempt import (
    HTTP1,
    HTTP2,
    MAX_ATTEMPTS,
    TUNNEL,
    Failure,
    RetryPolicy,
    begin,
    connect_failed,
    end,
    failed,
    may_retry,
)
from regional_gateway.proxy.exchange import Exchange
from regional_gateway.proxy.h2_upstream import Stream
from regional_gateway.proxy.route_state import BackendRuntime
from regional_gateway.proxy.routes import HealthCheck

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


def _backend(key: str = "b1", eject: int = 1) -> BackendRuntime:
    return BackendRuntime(key, "127.0.0.1", 8080, HealthCheck(eject_connect_failures=eject), None)


TRIES = [Exchange, lambda: Stream(1, [])]  # the HTTP/1.1 exchange and the HTTP/2 stream


@pytest.mark.parametrize("make", TRIES, ids=["http1", "h2"])
def test_begin_counts_once_and_end_is_idempotent(make) -> None:
    t, rt = make(), _backend()
    end(t)  # nothing begun: nothing to un-count
    assert rt.inflight == 0 and t.attempts == 0
    begin(t, rt)
    assert (rt.inflight, t.attempts, t.backend, t.counted) == (1, 1, rt, True)
    for _ in range(3):  # whatever paths end it, in whatever number: un-counted once
        end(t)
        assert rt.inflight == 0
    assert t.counted is False and t.attempts == 1


@pytest.mark.parametrize("make", TRIES, ids=["http1", "h2"])
def test_a_retry_moves_the_count_to_the_next_backend(make) -> None:
    t, first, second = make(), _backend("b1"), _backend("b2")
    begin(t, first)
    assert failed(t, HTTP1, Failure.CONNECT) is True
    begin(t, second)
    assert (first.inflight, second.inflight, t.attempts) == (0, 1, 2)
    end(t)
    end(t)
    assert (first.inflight, second.inflight) == (0, 0)


@pytest.mark.parametrize("policy,failure,options,want_tries", [
    (HTTP1, Failure.CONNECT, {}, MAX_ATTEMPTS),
    (HTTP1, Failure.CONNECT, {"body_sent": True}, 1),
    (HTTP1, Failure.RESET_BEFORE_ANSWER, {"idempotent": False}, 1),
    (HTTP1, Failure.STALE_POOLED, {"idempotent": False}, MAX_ATTEMPTS),
    (HTTP2, Failure.REFUSED_STREAM, {}, MAX_ATTEMPTS),
    (HTTP2, Failure.RESET_BEFORE_ANSWER, {}, 1),
    (TUNNEL, Failure.CONNECT, {}, MAX_ATTEMPTS),
    (RetryPolicy(frozenset((Failure.CONNECT,)), max_attempts=5), Failure.CONNECT, {}, 5),
])
def test_failing_every_try_stops_at_the_policy(policy, failure, options, want_tries) -> None:
    """Each try fails the same way: the exchange is tried as often as its policy allows, and every
    backend it touched ends with nothing in flight."""
    t = Exchange()
    backends = [_backend(f"b{i}") for i in range(8)]
    for rt in backends:
        begin(t, rt)
        if not failed(t, policy, failure, **options):
            break
    assert t.attempts == want_tries
    assert [rt.inflight for rt in backends] == [0] * 8


class _Host:
    """The health verdict's listener, as `ConnectionHost` is: the backends whose availability changed."""

    def __init__(self) -> None:
        self.now = 100.0
        self.changed: list[BackendRuntime] = []

    def health_changed(self, rt: BackendRuntime) -> None:
        self.changed.append(rt)


@pytest.mark.parametrize("eject,failures,want_changed", [
    (1, 1, 1),  # the first connect failure ejects the backend
    (1, 3, 1),  # told once, when it changes, not for every failure after
    (3, 2, 0),  # under the threshold: still available
    (0, 5, 0),  # passive ejection off
])
def test_connect_failed_tells_the_host_when_availability_changes(eject, failures, want_changed) -> None:
    host, rt = _Host(), _backend(eject=eject)
    for _ in range(failures):
        connect_failed(host, rt, "refused")
    assert host.changed == [rt] * want_changed
    assert rt.health.available is (want_changed == 0)

"""Response rate limiting, pure: a budget per client network, debt bounded by the window, slip."""

from __future__ import annotations

import pytest

from geodns.rrl import Action, RateLimiter, RrlConfig
from geomesh.errors import ValidationError

V4 = bytes([198, 51, 100, 7])
V4_SAME_24 = bytes([198, 51, 100, 200])
V4_OTHER = bytes([203, 0, 113, 7])


def run(rl: RateLimiter, client: bytes, n: int, now: float) -> list[Action]:
    return [rl.check(client, now) for _ in range(n)]


def test_budget_per_network_then_slip_every_second() -> None:
    rl = RateLimiter(RrlConfig(rate=5, window=15, slip=2))
    first = run(rl, V4, 5, 100.0)
    assert first == [Action.SEND] * 5
    limited = run(rl, V4_SAME_24, 6, 100.0)  # same /24: same budget
    assert limited == [Action.DROP, Action.SLIP] * 3
    assert run(rl, V4_OTHER, 5, 100.0) == [Action.SEND] * 5  # another network is not affected


def test_slip_zero_drops_all_and_slip_one_truncates_all() -> None:
    drop = RateLimiter(RrlConfig(rate=1, slip=0))
    assert run(drop, V4, 4, 0.0) == [Action.SEND, Action.DROP, Action.DROP, Action.DROP]
    tc = RateLimiter(RrlConfig(rate=1, slip=1))
    assert run(tc, V4, 3, 0.0) == [Action.SEND, Action.SLIP, Action.SLIP]


def test_budget_refills_and_debt_is_bounded_by_the_window() -> None:
    rl = RateLimiter(RrlConfig(rate=10, window=2, slip=0))
    run(rl, V4, 1000, 0.0)  # a flood: debt stops at -rate*window = -20
    assert rl.check(V4, 1.0) is Action.DROP  # one second earns 10, still in debt
    assert rl.check(V4, 3.5) is Action.SEND  # quiet long enough: budget back


def test_ipv6_networks_are_56() -> None:
    rl = RateLimiter(RrlConfig(rate=1, slip=0))
    a = bytes.fromhex("20010db8000000aa" + "00" * 8)
    b = bytes.fromhex("20010db8000000ff" + "11" * 8)  # same /56
    c = bytes.fromhex("20010db8000001aa" + "00" * 8)  # another /56
    assert rl.network(a) == rl.network(b) != rl.network(c)
    assert rl.check(a, 0) is Action.SEND and rl.check(b, 0) is Action.DROP and rl.check(c, 0) is Action.SEND


def test_table_is_bounded() -> None:
    rl = RateLimiter(RrlConfig(rate=1, window=1, max_tracked=100))
    for i in range(1000):
        rl.check(i.to_bytes(4, "big"), float(i))
    assert len(rl) <= 100


def test_off_by_default_and_config_checked() -> None:
    assert not RrlConfig().enabled
    with pytest.raises(ValidationError, match="rrl_slip"):
        RrlConfig(rate=5, slip=11)
    with pytest.raises(ValidationError, match="rrl_ipv4_prefix"):
        RrlConfig(rate=5, ipv4_prefix=33)

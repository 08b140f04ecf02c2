"""The shared follow/resume loop (`geomesh.follow`): `Backoff` as a table (fixed random), and the
loop driven by a scripted attempt with its own clock and sleep (pure asyncio, nothing on the
network): a stream that got something or lived long enough starts the backoff over, targets
rotate (one target stays), delays double up to the max, the caller hears of every retry. Plus the
two callers' settings, which must stay what they were: the routing feed 0.1 -> 5 s with a pause of
delay x [0.5, 1), the gateway's session 0.1 -> 2 s and Register 0.2 -> 5 s with delay x [0.5, 1.5)."""

from __future__ import annotations

import asyncio

import pytest

from geodns.feed import RoutingFeedClient
from geomesh.channel import Targets
from geomesh.errors import ValidationError
from geomesh.follow import HEALTHY_AFTER, Backoff, Retry, follow
from regional_gateway.agent import REGISTER_BACKOFF, SESSION_BACKOFF


def pauses(backoff: Backoff, draws: list[float]) -> list[float]:
    out = []
    for r in draws:
        pause, backoff = backoff.next(lambda r=r: r)
        out.append(pause)
    return out


@pytest.mark.parametrize(("backoff", "draws", "expected"), [
    # the delay doubles up to max; random 0 gives the low end of the jitter range
    (Backoff(0.1, 5.0), [0.0] * 8, [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5]),
    # random just under 1 gives (almost) the high end
    (Backoff(1.0, 4.0, jitter=(0.5, 1.5)), [0.5] * 4, [1.0, 2.0, 4.0, 4.0]),
    (Backoff(1.0, 4.0, jitter=(0.5, 1.5)), [0.0, 0.25, 0.75], [0.5, 1.5, 5.0]),
    # no jitter, another factor
    (Backoff(1.0, 10.0, factor=3.0, jitter=(1.0, 1.0)), [0.3] * 4, [1.0, 3.0, 9.0, 10.0]),
    # factor 1: a constant delay
    (Backoff(0.5, 0.5, factor=1.0, jitter=(1.0, 1.0)), [0.9] * 3, [0.5, 0.5, 0.5]),
])
def test_backoff_pauses(backoff, draws, expected):
    assert pauses(backoff, draws) == pytest.approx(expected)


def test_backoff_is_a_value_and_reset_starts_over():
    start = Backoff(0.1, 2.0)
    _, later = start.next(lambda: 0.0)
    _, later = later.next(lambda: 0.0)
    assert start.delay == 0.1 and later.delay == pytest.approx(0.4)  # next() changed nothing in place
    assert later.reset() == start
    assert Backoff(0.1, 2.0, delay=0.4) == later


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(initial=0.0, max=1.0), "initial"),
    (dict(initial=-1.0, max=1.0), "initial"),
    (dict(initial=2.0, max=1.0), "max"),
    (dict(initial=0.1, max=1.0, factor=0.5), "factor"),
    (dict(initial=0.1, max=1.0, jitter=(0.0, 1.0)), "jitter"),
    (dict(initial=0.1, max=1.0, jitter=(1.5, 0.5)), "jitter"),
    (dict(initial=0.1, max=1.0, jitter=(0.5,)), "jitter"),
    (dict(initial=0.1, max=1.0, delay=3.0), "delay"),
    (dict(initial=float("nan"), max=1.0), "initial"),
])
def test_backoff_refuses_bad_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        Backoff(**kwargs)
    assert info.value.field == field


class Done(Exception):
    """Ends a scripted run."""


def run_script(script: list[tuple[bool, float]], targets: list[str], backoff: Backoff,
               *, healthy_after: float = HEALTHY_AFTER) -> tuple[list[str], list[Retry], list[float]]:
    """Follow with an attempt that, call by call, lives `seconds` on a fake clock and returns
    `got`; after the script it raises Done. Returns the targets tried, the retries heard and the
    pauses slept."""
    now = [1000.0]
    tried: list[str] = []
    retries: list[Retry] = []
    slept: list[float] = []
    steps = iter(script)

    async def attempt(target: str) -> bool:
        tried.append(target)
        step = next(steps, None)
        if step is None:
            raise Done
        got, seconds = step
        now[0] += seconds
        return got

    async def sleep(pause: float) -> None:
        slept.append(pause)
        now[0] += pause

    async def main() -> None:
        with pytest.raises(Done):
            await follow(attempt, targets=Targets(targets), backoff=backoff, on_retry=retries.append,
                         healthy_after=healthy_after, clock=lambda: now[0], sleep=sleep, random=lambda: 0.0)

    asyncio.run(asyncio.wait_for(main(), 10))
    return tried, retries, slept


def test_failing_attempts_rotate_and_double():
    tried, retries, slept = run_script([(False, 0.1)] * 5, ["a", "b", "c"], Backoff(1.0, 8.0, jitter=(1.0, 1.0)))
    assert tried == ["a", "b", "c", "a", "b", "c"]
    assert slept == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert retries == [Retry(t, False, p) for t, p in zip("abcab", slept, strict=True)]


def test_a_stream_that_got_something_starts_the_backoff_over():
    script = [(False, 0.0), (False, 0.0), (True, 0.0), (False, 0.0), (True, 0.0)]
    _, retries, slept = run_script(script, ["a"], Backoff(1.0, 8.0, jitter=(1.0, 1.0)))
    assert slept == [1.0, 2.0, 1.0, 2.0, 1.0]
    assert [r.healthy for r in retries] == [False, False, True, False, True]


@pytest.mark.parametrize(("lived", "healthy"), [
    (HEALTHY_AFTER + 0.5, True),   # a long quiet stream was working too
    (HEALTHY_AFTER, False),        # not longer than healthy_after: still failing
    (0.0, False),
])
def test_a_stream_that_lived_long_enough_starts_the_backoff_over(lived, healthy):
    _, retries, slept = run_script([(False, 0.0), (False, 0.0), (False, lived)], ["a"],
                                   Backoff(1.0, 8.0, jitter=(1.0, 1.0)))
    assert slept == [1.0, 2.0, 1.0 if healthy else 4.0]
    assert retries[-1].healthy is healthy


def test_one_target_stays_and_the_pause_has_the_callers_jitter():
    tried, _, slept = run_script([(False, 0.0)] * 3, ["only"], Backoff(0.1, 5.0))
    assert tried == ["only"] * 4
    assert slept == pytest.approx([0.05, 0.1, 0.2])  # random 0: the low end, delay x 0.5


def test_an_attempt_that_raises_ends_the_loop_without_a_retry():
    tried, retries, slept = run_script([], ["a", "b"], Backoff(1.0, 2.0))
    assert (tried, retries, slept) == (["a"], [], [])


@pytest.mark.parametrize(("caller", "initial", "maximum", "low", "high"), [
    ("feed", 0.1, 5.0, 0.5, 1.0),
    ("session", 0.1, 2.0, 0.5, 1.5),
    ("register", 0.2, 5.0, 0.5, 1.5),
])
def test_the_callers_keep_their_delays_and_jitter(caller, initial, maximum, low, high):
    """The formulas they had: feed delay*(0.5+r/2), gateway delay*(0.5+r), each doubled to its max."""
    backoff = {"session": SESSION_BACKOFF, "register": REGISTER_BACKOFF}.get(caller) \
        or RoutingFeedClient(["127.0.0.1:1"], None, lambda table: None).backoff
    assert (backoff.initial, backoff.max, backoff.factor, backoff.jitter) == (initial, maximum, 2.0, (low, high))
    for r in (0.0, 0.3, 0.999):
        pause, _ = backoff.next(lambda r=r: r)
        old = initial * (0.5 + r / 2) if high == 1.0 else initial * (0.5 + r)
        assert pause == old

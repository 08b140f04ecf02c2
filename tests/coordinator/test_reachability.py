"""Table tests of the reachability decision (`coordinator.reachability.decide`)."""

from __future__ import annotations

import pytest

from coordinator.reachability import Vote, decide

# three regions, as in the lab; a fourth and fifth for quorum cases
GW = {"eu1": "eu", "eu2": "eu", "us1": "us", "ap1": "ap", "sa1": "sa", "af1": "af"}
LIVE = frozenset(GW)


def votes(spec: str, at: float = 0.0) -> list[Vote]:
    """'us1>eu1:down ap1>eu1:up' -> votes."""
    out = []
    for item in spec.split():
        pair, state = item.split(":")
        prober, target = pair.split(">")
        out.append(Vote(prober, target, state == "up", rtt_ms=5.0 if state == "up" else 0.0, at=at))
    return out


def base(*down_targets: str, regions=("us", "ap", "sa", "af", "eu")) -> str:
    """Every region's first gateway votes about every other region's gateways; up unless listed."""
    firsts = {r: next(n for n, rr in GW.items() if rr == r) for r in regions}
    out = []
    for r, p in firsts.items():
        for t, tr in GW.items():
            if tr != r and tr in regions:
                out.append(f"{p}>{t}:{'down' if t in down_targets else 'up'}")
    return " ".join(out)


CASES = [
    # (name, gateways, votes, previous, expected unreachable, expected cut-off regions)
    ("all up", GW, base(), set(), set(), set()),
    ("one gateway down, seen by four regions", GW, base("eu1"), set(), {"eu1"}, set()),
    ("one region says down: no quorum", GW, base() + " us1>eu1:down", set(), set(), set()),
    ("two of four say down: below quorum 3", GW,
     base().replace("us1>eu1:up", "us1>eu1:down").replace("ap1>eu1:up", "ap1>eu1:down"), set(), set(), set()),
    ("three of four say down: quorum", GW,
     base().replace("us1>eu1:up", "us1>eu1:down").replace("ap1>eu1:up", "ap1>eu1:down")
     .replace("sa1>eu1:up", "sa1>eu1:down"), set(), {"eu1"}, set()),
    # us probes only eu and reaches none of it: as far as anyone can tell, us is the one cut off
    ("only one voting region: fail-open", {"eu1": "eu", "us1": "us"}, "us1>eu1:down", set(), set(), {"us"}),
    ("two regions, both down: quorum of 2", {"eu1": "eu", "us1": "us", "ap1": "ap"},
     "us1>eu1:down ap1>eu1:down us1>ap1:up ap1>us1:up", set(), {"eu1"}, set()),
    ("previously down, one region up: stays down", {"eu1": "eu", "us1": "us", "ap1": "ap"},
     "us1>eu1:up ap1>eu1:down us1>ap1:up ap1>us1:up", {"eu1"}, {"eu1"}, set()),
    ("previously down, quorum up: back", {"eu1": "eu", "us1": "us", "ap1": "ap"},
     "us1>eu1:up ap1>eu1:up us1>ap1:up ap1>us1:up", {"eu1"}, set(), set()),
    ("a cut-off region's votes do not count", GW,
     " ".join(v.replace(":up", ":down") if v.startswith("eu1>") else v for v in base().split()), set(), set(),
     {"eu"}),
    ("one region of a gateway's voices up: not all down", GW,
     base("eu1") + " us1>eu2:up", set(), {"eu1"}, set()),
]


@pytest.mark.parametrize("name,gws,spec,previous,unreachable,cut", CASES, ids=[c[0] for c in CASES])
def test_decide_table(name, gws, spec, previous, unreachable, cut) -> None:
    d = decide(gws, votes(spec), live=frozenset(gws), previous=frozenset(previous))
    assert d.unreachable == frozenset(unreachable)
    assert d.cut_off == frozenset(cut)


def test_a_region_reaching_half_of_the_others_is_not_cut_off() -> None:
    gws = {"eu1": "eu", "us1": "us", "ap1": "ap"}
    # eu1's public link is down: us and ap each reach 1 of 2 regions (half), eu reaches none
    spec = "us1>eu1:down us1>ap1:up ap1>eu1:down ap1>us1:up eu1>us1:down eu1>ap1:down"
    d = decide(gws, votes(spec), live=frozenset(gws))
    assert d.cut_off == frozenset({"eu"})
    assert d.unreachable == frozenset({"eu1"})
    assert d.verdicts["eu1"].down_by == ("ap", "us")
    assert d.verdicts["us1"].seen_by == ("ap",)  # eu's vote did not count


def test_panic_threshold_caps_unreachable_and_keeps_the_old_ones() -> None:
    gws = {f"g{i}": f"r{i}" for i in range(10)}
    down = {"g0", "g1", "g2", "g3"}  # every region reaches 5-6 of the 9 others: none is cut off
    spec = " ".join(f"{p}>{t}:{'down' if t in down else 'up'}" for p in gws for t in gws if p != t)
    free = decide(gws, votes(spec), live=frozenset(gws))
    assert free.unreachable == frozenset(down) and not free.panic_held
    d = decide(gws, votes(spec), live=frozenset(gws), previous=frozenset({"g3"}), max_share=0.2)
    assert len(d.unreachable) == 2  # cap: a fifth of 10
    assert "g3" in d.unreachable     # already out: stays out
    assert len(d.panic_held) == 2 and not set(d.panic_held) & d.unreachable
    assert all(d.verdicts[n].reachable for n in d.panic_held)


def test_bad_votes_are_ignored_and_counted() -> None:
    gws = {"eu1": "eu", "eu2": "eu", "us1": "us", "ap1": "ap"}
    bad = [Vote("us1", "nope", False), Vote("ghost", "eu1", False), Vote("eu1", "eu1", False),
           Vote("eu2", "eu1", False), Vote("ap1", "eu1", False, at=-100.0)]
    d = decide(gws, bad + [Vote("us1", "eu1", False)], live=frozenset(gws) - {"us1"}, now=0.0, max_age=10.0)
    assert d.ignored == {"unknown-target": 1, "unknown-prober": 1, "self": 1, "same-region": 1, "stale": 1,
                         "prober-not-live": 1}
    assert d.unreachable == frozenset()


def test_rtt_is_the_best_up_vote() -> None:
    gws = {"eu1": "eu", "us1": "us", "ap1": "ap"}
    vs = [Vote("us1", "eu1", True, 12.0), Vote("ap1", "eu1", True, 7.5)]
    assert decide(gws, vs, live=frozenset(gws)).verdicts["eu1"].rtt_ms == 7.5

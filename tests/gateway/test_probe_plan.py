"""The probe plan (`geomesh.probe_plan`): coverage, stability and cost, for sizes up to N = 1000."""

from __future__ import annotations

import random

import pytest

from geomesh.probe_plan import plan


def mesh(n: int, regions: int, seed: int = 1) -> dict[str, str]:
    rnd = random.Random(seed)
    return {f"gw-{i:04d}": f"r{rnd.randrange(regions):02d}" for i in range(n)}


@pytest.mark.parametrize("n,regions,m", [(3, 3, 3), (12, 4, 3), (100, 10, 3), (1000, 20, 3), (50, 5, 2)])
def test_every_gateway_is_probed_from_m_other_regions(n: int, regions: int, m: int) -> None:
    gws = mesh(n, regions)
    p = plan(gws, m)
    present = set(gws.values())
    for target, region in gws.items():
        from_regions = {gws[x] for x in p.probers_of(target)}
        assert region not in from_regions
        assert len(from_regions) >= min(m, len(present) - 1), target


def test_every_region_probes_every_other_region() -> None:
    gws = mesh(300, 12)
    p = plan(gws, 3)
    seen = {(gws[pr], gws[t]) for pr, ts in p.targets.items() for t in ts}
    regions = set(gws.values())
    assert seen == {(a, b) for a in regions for b in regions if a != b}


def test_plan_is_deterministic_and_a_join_moves_little() -> None:
    gws = mesh(200, 8)
    a, b = plan(gws, 3), plan(dict(gws), 3)
    assert a == b
    joined = dict(gws, **{"gw-new": "r03"})
    c = plan(joined, 3)
    changed = sum(1 for t in gws if a.probers_of(t) != c.probers_of(t))
    assert changed <= len(gws) // 8  # roughly the targets whose r03 prober is now gw-new


def test_probe_load_per_gateway_does_not_grow_with_n() -> None:
    loads = {}
    for n in (100, 1000):
        p = plan(mesh(n, 20), 3)
        out = [len(p.targets_of(g)) for g in mesh(n, 20)]
        loads[n] = sum(out) / n
    # m probes per target plus region coverage: about 3 + R(R-1)/N
    assert loads[100] <= 3 + 20 * 19 / 100 + 0.01
    assert loads[1000] <= 3 + 20 * 19 / 1000 + 0.01


def test_m_must_be_positive() -> None:
    with pytest.raises(ValueError, match="prober regions"):
        plan({"a": "x"}, 0)

"""The static-stability scenarios of bench/faults.py (issue 14) as tests, with short outages.

Real processes on loopback: etcd, a coordinator, two gateway agents (proxy in front of one
backend per region) and two geomesh-dns with --state-dir, under a steady load of DNS queries
from a client of every region and HTTP requests through every gateway. Asserted: no DNS answer
and no HTTP request failed while etcd is down, while the coordinator is down, while both are
down and a gateway and a DNS server restart (served from their saved state), and across a
planned restart of the single coordinator replica. No timing is asserted (the restart times and
largest latencies are printed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench._procs import make_pki
from bench.faults import Settings, static_scenario


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run scripts/install.sh (./run test does)")
    work = tmp_path_factory.mktemp("static")
    return Settings(duration=0.0, ops=0, work=work, pki=make_pki(work / "pki"), outage=3.0)


@pytest.mark.parametrize("kind", ["etcd", "coordinator", "both", "planned"])
async def test_static_stability_scenario(settings: Settings, kind: str) -> None:
    row = await static_scenario(settings, kind, settle=5.0)
    print(row)
    assert row["dns_queries"] > 50 and row["http_requests"] > 50, row
    assert row["dns_failed"] == 0, row
    assert row["http_failed"] == 0, row
    if kind == "both":
        work = Path(settings.work) / "static-both"
        assert "serving the saved state" in (work / "gw-eu-central" / "gateway.log").read_text()
        assert '"source": "saved state"' in (work / "dns-1" / "dns-1.log").read_text()

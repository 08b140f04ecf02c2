"""bench/probe_traffic.py still runs (quick mode) and its figures hold together: a probe costs a
plausible number of packets and bytes (the TLS handshake more), and in the plan every gateway is
probed from m regions and sends about m probes per interval, far from N - 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_probe_traffic_quick(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "bench/probe_traffic.py", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    plain, tls = result["probe"]["plain"], result["probe"]["tls"]
    assert 7 <= plain["packets"] <= 20 and 300 <= plain["ip_bytes"] <= 2000, plain
    assert tls["packets"] > plain["packets"] and tls["ip_bytes"] > plain["ip_bytes"] + 500, tls
    rows = result["rows"]
    assert [(r["n"], r["regions"]) for r in rows] == [(100, 10), (100, 20)]
    for r in rows:
        assert r["received_min"] >= r["m"]  # seen from m regions at least
        assert r["m"] <= r["sent_mean"] <= r["design"] + 1e-9 < r["full_mesh"]
        assert r["bytes_per_s_plain_mean"] == r["both_mean"] / result["interval"] * plain["ip_bytes"]

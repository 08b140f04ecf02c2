"""The benchmarks still run: each in a short mode, against the real servers it measures.

No timing is asserted (the machine is shared); the JSON each bench writes must have every row,
real counts and sizes, and the relations that do not depend on speed (every join reached every
gateway; a full-map join costs a gateway more bytes than a delta join).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def run_bench(script: str, out: Path, timeout: float, *extra: str) -> dict:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: run scripts/install.sh (./run test does)")
    proc = subprocess.run([sys.executable, f"bench/{script}", "--quick", "--json", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_coordinator_bench_quick(tmp_path: Path) -> None:
    result = run_bench("coordinator.py", tmp_path / "coord.json", timeout=60)
    phases = result["phases"]
    writes = ["ours_seq", "raw_put_seq", "raw_txn_seq", "raw_txnw_seq", "noop_seq", "ours_c", "raw_put_c",
              "raw_txn_c", "raw_txnw_c", "noop_c"]
    watches = ["watch_raw", "watch_ours", "watch_admin"]
    assert set(phases) == set(writes + watches)
    for key in writes:
        p = phases[key]
        assert p["ops"] > 0 and p["errors"] == 0, (key, p)
        assert p["rate"] > 0 and p["p50"] > 0 and p["p99"] >= p["p50"], (key, p)
    for key in watches:
        p = phases[key]
        assert p["ops"] > 0 and p["errors"] == 0, (key, p)
        assert p["p50"] > 0 and p["p99"] >= p["p50"] and not math.isnan(p["ack_p99"]), (key, p)
    # the coordinator's CPU is charged only to the phases that go through it
    assert phases["ours_seq"]["coord_cpu_ms"] > 0
    assert {a["measure"].strip() for a in result["aims"]} >= {"writes/s, concurrent",
                                                               "watch delivery p99 from write start (ms)"}
    # the floor row is the no-op RPC plus the raw txn, as measured in this run
    floor = next(a for a in result["aims"] if a["measure"].strip().startswith("floor"))
    assert floor["ours"] == phases["noop_seq"]["p50"] + phases["raw_txn_seq"]["p50"]
    assert floor["raw"] == phases["raw_txn_seq"]["p50"]


def test_mesh_convergence_bench_quick(tmp_path: Path) -> None:
    result = run_bench("mesh_convergence.py", tmp_path / "mesh.json", timeout=90)
    phases = {(p["n"], p["strategy"]): p for p in result["phases"]}
    assert set(phases) == {(20, "delta"), (20, "full-map")}
    for (n, strategy), p in phases.items():
        s = p["summary"]
        assert p["sessions"] == n, (strategy, p["note"])
        assert s["joins"] == 3 and s["complete"] == 3, (strategy, p["note"], p["joins"])
        assert not math.isnan(s["p99_ms"]) and s["call_p99_ms"] > 0, (strategy, s)
        assert s["bytes_mean"] > 0 and s["msgs_mean"] >= 1, (strategy, s)
        assert p["first_bytes_mean"] > 0
        assert s["joiner_snapshot_bytes"] > 0  # the joiner's full snapshot
    # a full map carries every peer; a delta carries the change
    assert phases[(20, "full-map")]["summary"]["bytes_mean"] > phases[(20, "delta")]["summary"]["bytes_mean"]


def test_http_bench_runs_every_system(tmp_path: Path) -> None:
    """bench/http.py, one short round: HAProxy, the gateway and the floor relay all answer under wrk."""
    for tool in ("wrk", "haproxy", "nginx"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/install.sh (./run test does)")
    out = tmp_path / "http.json"
    proc = subprocess.run([sys.executable, "bench/http.py", "--duration", "1", "--rounds", "1", "--policies", "rr",
                           "--conns", "8", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"http.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert set(result["systems"]) == {"haproxy-rr", "geomesh-rr", "floor-rr"}
    for name, runs in result["systems"].items():
        (run,) = runs
        assert run["rps"] > 0 and run["errors"] == 0, (name, run)
        assert run["user_us"] >= 0 and run["sys_us"] >= 0, (name, run)
    rr = result["summary"]["rr"]
    assert rr["ratio"] == rr["geomesh_rps"] / rr["haproxy_rps"]
    assert result["summary"]["floor"]["rps"] == result["systems"]["floor-rr"][0]["rps"]
    # the aim in CPU per request, from the same runs: HAProxy's CPU / 0.9, less the floor's
    budget = result["summary"]["budget"]
    cpu = {name: runs[0]["user_us"] + runs[0]["sys_us"] for name, runs in result["systems"].items()}
    assert budget["allowed_us"] == pytest.approx(cpu["haproxy-rr"] / 0.9)
    assert budget["headroom_us"] == pytest.approx(cpu["haproxy-rr"] / 0.9 - cpu["floor-rr"])
    assert budget["over_floor_us"] == pytest.approx(cpu["geomesh-rr"] - cpu["floor-rr"])


def test_proxy_path_bench_runs_the_real_exchange(tmp_path: Path) -> None:
    """bench/proxy_path.py drives the gateway's real objects (it fails when an exchange does not complete)
    for every policy and the floor, and reports the gateway's work as the difference to the floor."""
    out = tmp_path / "path.json"
    proc = subprocess.run([sys.executable, "bench/proxy_path.py", "--requests", "2000", "--repeats", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"proxy_path.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert set(result) == {"floor", "geomesh-rr", "geomesh-lc", "geomesh-hash"}
    for name in ("geomesh-rr", "geomesh-lc", "geomesh-hash"):
        assert result[name]["over_floor_us"] == result[name]["best_us"] - result["floor"]["best_us"]


def test_h2_bench_runs_every_system(tmp_path: Path) -> None:
    """bench/h2.py, one short round: HAProxy and the gateway in both g modes serve every request."""
    for tool in ("h2load", "haproxy", "nginx"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/install.sh (./run test does)")
    out = tmp_path / "h2.json"
    proc = subprocess.run([sys.executable, "bench/h2.py", "--duration", "1", "--rounds", "1", "--clients", "2",
                           "--streams", "4", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"h2.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"haproxy", "geomesh", "geomesh-tunnel"}
    for name, (run,) in result["runs"].items():
        assert run["succeeded"] > 0 and run["failed"] == 0 and run["non_2xx"] == 0, (name, run)
    for mode in ("geomesh", "geomesh-tunnel"):
        assert result["summary"][mode]["ratio"] == result["runs"][mode][0]["rps"] / result["runs"]["haproxy"][0]["rps"]


def test_abuse_bench_runs_a_gateway_and_a_dns_scenario(tmp_path: Path) -> None:
    """bench/abuse.py --quick on one gateway and one DNS scenario: the victim is measured quiet and
    attacked, the attacker really attacked, and the server survived and served afterwards."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: run scripts/install.sh (./run test does)")
    out = tmp_path / "abuse.json"
    proc = subprocess.run([sys.executable, "bench/abuse.py", "--quick", "--scenarios", "slowloris,dns-cache",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"abuse.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(result) == {"slowloris", "dns-cache"}
    for name, r in result.items():
        assert r["quiet"]["requests"] > 0 and r["quiet"]["errors"] == 0, (name, r["quiet"])
        assert r["attacked"]["requests"] > 0, (name, r["attacked"])
        assert r["attacker"].get("sent", 0) > 0, (name, r["attacker"])
        assert r["server"]["alive"] and r["server"]["served_after"], (name, r["server"])
        assert r["server"]["rss_peak_mb"] >= r["server"]["rss_start_mb"] > 0, (name, r["server"])
    assert result["dns-cache"]["attacker"]["unit"] == "unique 4 KB queries"


@pytest.mark.netns
def test_failover_bench_quick_measures_every_case(tmp_path: Path) -> None:
    """bench/failover.py --quick (2 trials per case, 4 s windows) on the real lab topology: every
    timed case got a figure in every trial (no miss: DNS did move), the isolated region was named
    cut off, and with every link cut DNS never answered NODATA. No timing is asserted."""
    from geomesh.lab.runner import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"the failover bench needs the lab's namespaces and wireguard-go: {reason}")
    out = tmp_path / "failover.json"
    proc = subprocess.run([sys.executable, "bench/failover.py", "--quick", "--window", "4", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"failover.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"link-out", "link-back", "crash-out", "stop-out"}
    for row, r in result["rows"].items():
        assert r["misses"] == 0 and len(r["samples"]) == 2 and all(s > 0 for s in r["samples"]), (row, r)
    assert result["isolate"]["cut_off_named"] == 2 and result["isolate"]["excluded"] == [], result["isolate"]
    assert result["all_cut"]["answers"] > 0 and result["all_cut"]["nodata"] == 0, result["all_cut"]


def test_faults_bench_quick_runs_every_scenario(tmp_path: Path) -> None:
    """bench/faults.py --quick on a real 3-member TLS etcd cluster: every scenario made its row,
    the faults happened, and what does not depend on speed holds (no acknowledged write lost, no
    alive key deleted, no linearizability violation). No timing is asserted."""
    result = run_bench("faults.py", tmp_path / "faults.json", 120,  # static-*: tests/bench/test_faults_static.py
                       "--scenarios", "leader-kill,own-member,linearizability")
    rows = {r["scenario"]: r for r in result["rows"]}
    assert set(rows) == {"leader-kill", "own-member", "linearizability"}
    kill, own, lin = rows["leader-kill"], rows["own-member"], rows["linearizability"]
    assert kill["writes"] > 0 and kill["raw_writes"] > 0 and kill["lost"] == 0 and kill["raw_lost"] == 0, kill
    assert own["writes"] > 0 and own["alive_deleted"] == 0 and own["lost"] == 0, own
    assert math.isfinite(own["failover_s"]), own
    assert lin["ops"] >= 2000 and len(lin["faults"]) == 3 and lin["violations"] == 0, lin

"""The figures of the mesh-convergence benchmark (bench/mesh_convergence.py): one record per join
(how long until every gateway had the new peer, the bytes and messages it cost each of them),
one per phase (N gateways, one strategy) with its summary, the printed report of all phases, and
the check of the results against the issue's aims.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from bench import _stats

STRATEGIES = {"delta": "coordinator.main", "full-map": "bench.full_map_coordinator"}  # coordinator module run
P99_AIM_S = 1.0
FLAT_TOLERANCE = 1.25  # "flat in N": bytes per join at the largest N within 25% of the smallest N's


@dataclass
class Join:
    joiner: str
    complete: bool
    register_ms: float
    converge_ms: float                 # max over gateways of (peer received - Register returned)
    converge_from_call_ms: float       # max over gateways of (peer received - Register called)
    per_gateway_ms: list[float]
    bytes_per_gateway: list[int]
    msgs_per_gateway: list[int]
    missing: int                       # gateways that never got the peer within the timeout
    coord_cpu_ms: float
    joiner_snapshot_bytes: int
    session_not_found: int             # joiner's Session refused NOT_FOUND after Register succeeded


@dataclass
class Phase:
    n: int
    strategy: str
    register_s: float = 0.0
    open_s: float = 0.0
    sessions: int = 0
    first_bytes_mean: float = 0.0
    joins: list[Join] = field(default_factory=list)
    joins_seconds: float = 0.0
    coord_cpu_pct: float = math.nan
    client_cpu_pct: float = math.nan
    open_coord_cpu_pct: float = math.nan
    open_retries: int = 0
    settle_s: float = math.nan
    settled: bool = False
    open_client_cpu_pct: float = math.nan
    note: str = ""

    def summary(self) -> dict:
        done = [j for j in self.joins if j.complete]
        conv = [j.converge_ms for j in done]
        per = [x for j in done for x in j.per_gateway_ms]
        # bytes of an unfinished join are not attributable to it (other changes keep arriving): complete only
        b = [x for j in done for x in j.bytes_per_gateway]
        m = [x for j in done for x in j.msgs_per_gateway]
        return {
            "joins": len(self.joins), "complete": len(done),
            "p50_ms": _stats.pct(conv, 0.5), "p99_ms": _stats.pct(conv, 0.99), "max_ms": max(conv, default=math.nan),
            "call_p50_ms": _stats.pct([j.converge_from_call_ms for j in done], 0.5),
            "call_p99_ms": _stats.pct([j.converge_from_call_ms for j in done], 0.99),
            "session_not_found": sum(j.session_not_found for j in self.joins),
            "gw_p50_ms": _stats.pct(per, 0.5), "gw_p99_ms": _stats.pct(per, 0.99),
            "bytes_mean": sum(b) / len(b) if b else math.nan, "bytes_max": max(b, default=math.nan),
            "msgs_mean": sum(m) / len(m) if m else math.nan,
            "total_bytes_per_join": (sum(b) / len(done)) if done else math.nan,
            "register_ms_p50": _stats.pct([j.register_ms for j in self.joins], 0.5),
            "register_ms_p99": _stats.pct([j.register_ms for j in self.joins], 0.99),
            "coord_cpu_ms_per_join": _stats.median([j.coord_cpu_ms for j in self.joins]),
            "joiner_snapshot_bytes": _stats.median([j.joiner_snapshot_bytes for j in self.joins]),
        }


def print_report(args: argparse.Namespace, phases: list[Phase], placement: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    by = {(p.n, p.strategy): p.summary() for p in phases}
    ns = sorted({p.n for p in phases})
    strategies = [s for s in STRATEGIES if any(p.strategy == s for p in phases)]

    t = Table(title=f"mesh convergence: a join seen by all N gateways ({placement})")
    for col in ("N", "strategy", "joins ok", "p50 ms", "p99 ms", "p50 from call", "p99 from call",
                "per-gw p50", "per-gw p99", "Register p99", "bytes/gw/join", "msgs/gw/join", "sent/join",
                "coord CPU ms/join", "coord CPU %", "client CPU %"):
        t.add_column(col, justify="left" if col in ("strategy",) else "right")
    for p in phases:
        s = by[(p.n, p.strategy)]
        t.add_row(str(p.n), p.strategy, f"{s['complete']}/{s['joins']}", _stats.fmt(s["p50_ms"], 1),
                  _stats.fmt(s["p99_ms"], 1), _stats.fmt(s["call_p50_ms"], 1), _stats.fmt(s["call_p99_ms"], 1),
                  _stats.fmt(s["gw_p50_ms"], 1), _stats.fmt(s["gw_p99_ms"], 1), _stats.fmt(s["register_ms_p99"], 1),
                  _stats.fmt_bytes(s["bytes_mean"]), _stats.fmt(s["msgs_mean"], 1),
                  _stats.fmt_bytes(s["total_bytes_per_join"]), _stats.fmt(s["coord_cpu_ms_per_join"], 0),
                  _stats.fmt(p.coord_cpu_pct, 0), _stats.fmt(p.client_cpu_pct, 0))
    console.print(t)

    setup = Table(title="setup per phase (informative)")
    for col in ("N", "strategy", "register all s", "open all sessions s", "CPU % coord/clients", "sessions",
                "session retries", "settled after s",
                "joiner snapshot", "Register ms p50", "Session NOT_FOUND after Register", "joins wall s", "note"):
        setup.add_column(col, justify="left" if col in ("strategy", "note") else "right")
    for p in phases:
        s = by[(p.n, p.strategy)]
        setup.add_row(str(p.n), p.strategy, _stats.fmt(p.register_s, 1), _stats.fmt(p.open_s, 1),
                      f"{_stats.fmt(p.open_coord_cpu_pct, 0)}/{_stats.fmt(p.open_client_cpu_pct, 0)}", str(p.sessions),
                      str(p.open_retries), _stats.fmt(p.settle_s, 1) + ("" if p.settled else " (NOT settled)"),
                      _stats.fmt_bytes(s["joiner_snapshot_bytes"]),
                      _stats.fmt(s["register_ms_p50"], 1), str(s["session_not_found"]), _stats.fmt(p.joins_seconds, 1),
                      p.note.strip())
    console.print(setup)

    side = Table(title="side by side: delta (ours) vs full-map, per N")
    cols = ["N"]
    for s_name in strategies:
        cols += [f"{s_name} p50 ms", f"{s_name} p99 ms", f"{s_name} bytes/gw/join"]
    if len(strategies) == 2:
        cols += ["p99 full/delta", "bytes full/delta"]
    for col in cols:
        side.add_column(col, justify="right")
    for n in ns:
        row = [str(n)]
        for s_name in strategies:
            s = by.get((n, s_name))
            row += ([_stats.fmt(s["p50_ms"], 1), _stats.fmt(s["p99_ms"], 1), _stats.fmt_bytes(s["bytes_mean"])]
                    if s else ["-", "-", "-"])
        if len(strategies) == 2 and (n, "delta") in by and (n, "full-map") in by:
            d, f = by[(n, "delta")], by[(n, "full-map")]
            row += [_stats.fmt(_stats.ratio(f["p99_ms"], d["p99_ms"]), 1) + "x",
                    _stats.fmt(_stats.ratio(f["bytes_mean"], d["bytes_mean"]), 1) + "x"]
        side.add_row(*row)
    console.print(side)

    for line in aims(by, ns):
        console.print(line)
    console.print(
        "convergence = max over the N existing gateways of (time the gateway read the SessionDown carrying the joiner "
        "as a peer - time the joiner's Register returned); p50/p99 over the joins (with 20 joins, p99 is the "
        "slowest join). bytes/gw/join = serialized SessionDown bytes one existing gateway read for the join (the "
        "Register revision and the joiner's alive revision). full-map = the same coordinator, etcd and streams, but "
        "every mesh change sends every gateway its whole peer list (snapshot) instead of the changed peer.")


def aims(by: dict, ns: list[int]) -> list[str]:
    lines = []
    big = max(ns)
    d = by.get((big, "delta"))
    if d is not None:
        complete = d["complete"] == d["joins"]
        ok = complete and d["p99_ms"] < P99_AIM_S * 1000
        ok_call = complete and d["call_p99_ms"] < P99_AIM_S * 1000
        lines.append(f"aim p99 < 1 s at N = {big} (delta): from Register returning p99 = {_stats.fmt(d['p99_ms'], 1)} ms "
                     f"-> {'holds' if ok else 'DOES NOT HOLD'}; from Register called p99 = "
                     f"{_stats.fmt(d['call_p99_ms'], 1)} ms -> {'holds' if ok_call else 'DOES NOT HOLD'}; "
                     f"{d['complete']}/{d['joins']} joins complete"
                     + ("" if big >= 1000 else f" (only N = {big} was run; the aim is stated for N = 1000)"))
    # flatness: the smallest and the largest N whose joins completed (bytes of unfinished joins are not a join's)
    measured = [n for n in ns if (n, "delta") in by and by[(n, "delta")]["complete"]]
    if len(measured) < 2:
        lines.append("aim bytes per join flat in N (delta): needs complete joins at two sizes -> not measured")
        return lines
    small, large = measured[0], measured[-1]
    ds, dl = by[(small, "delta")], by[(large, "delta")]
    r = _stats.ratio(dl["bytes_mean"], ds["bytes_mean"])
    lines.append(f"aim bytes per join flat in N (delta): {_stats.fmt_bytes(ds['bytes_mean'])} at N = {small}, "
                 f"{_stats.fmt_bytes(dl['bytes_mean'])} at N = {large} (x{_stats.fmt(r, 2)}) -> "
                 f"{'holds' if r <= FLAT_TOLERANCE else 'DOES NOT HOLD'}"
                 + ("" if large == big else f" (no join completed at N = {big})"))
    fs, fl = by.get((small, "full-map")), by.get((large, "full-map"))
    if fs is not None and fl is not None and fs["complete"] and fl["complete"]:
        lines.append(f"  full-map for comparison: {_stats.fmt_bytes(fs['bytes_mean'])} at N = {small}, "
                     f"{_stats.fmt_bytes(fl['bytes_mean'])} at N = {large} "
                     f"(x{_stats.fmt(_stats.ratio(fl['bytes_mean'], fs['bytes_mean']), 1)})")
    return lines

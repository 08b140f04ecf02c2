"""The status page's view model: pure functions from a coordinator `Overview` to what the page shows.

`view_of(overview)` turns one `Admin/GetOverview` answer into a JSON-ready `View`: regions with
their coordinates and counts, every gateway's health, the mesh matrix aggregated per region pair,
and the app-to-region map. `events_between(old, new, at)` diffs two successive views into the
feed of recent events (gateways joining and leaving, session and reachability verdict changes,
draining, DNS membership, a region losing or regaining every gateway GeoDNS answers: a
failover; certificates obtained, renewed or failing to renew). No I/O here: the follower and the HTTP server are elsewhere.

A mesh link counts as up when both ends are alive (session open or timed out) and reachable:
that is what the coordinator knows. Each gateway also reports its WireGuard peers' handshake
ages (`GatewayHealth.peers`); a gateway pair's age is the worse of what its two ends reported
(`pair_age`), and a matrix cell is coloured by the worst age of its pairs (`age_class`: fresh
within 135 s, as WireGuard rekeys every 120 s; stale up to 180 s; past that, or never, its keys
are rejected) when any end reported one, else by the share of links up (`cell_class`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from geomesh.api import geomesh_pb2 as pb

SESSION_NAMES = {pb.SESSION_STATE_UNSPECIFIED: "unknown", pb.SESSION_STATE_OPEN: "open",
                 pb.SESSION_STATE_TIMED_OUT: "timed_out", pb.SESSION_STATE_CLOSED: "closed"}
MAX_EVENTS = 200  # the feed keeps this many recent events
HANDSHAKE_FRESH = 135.0  # s: WireGuard rekeys every 120 s while traffic or keepalives flow
HANDSHAKE_STALE = 180.0  # s: REJECT_AFTER_TIME: past it the session's keys are refused
NEVER = math.inf  # a pair that never completed a handshake (reported as age 0)


@dataclass(frozen=True, slots=True)
class GatewayView:
    name: str
    region: str
    session: str  # open, timed_out, closed, unknown
    reachable: bool
    seen_by: tuple[str, ...]
    down_by: tuple[str, ...]
    probe_rtt_ms: float
    draining: bool
    in_dns: bool
    load: float = 0.0
    active_connections: int = 0
    version: str = ""
    handshakes: dict[str, float] = field(default_factory=dict, compare=False)  # peer -> age (NEVER: never)

    @property
    def alive(self) -> bool:
        return self.session in ("open", "timed_out")

    @property
    def link_ok(self) -> bool:
        """This end of a mesh link is fine as far as the coordinator knows."""
        return self.alive and self.reachable

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "region": self.region, "session": self.session, "reachable": self.reachable,
                "seen_by": list(self.seen_by), "down_by": list(self.down_by),
                "probe_rtt_ms": round(self.probe_rtt_ms, 2), "draining": self.draining, "in_dns": self.in_dns,
                "load": round(self.load, 3), "active_connections": self.active_connections, "version": self.version,
                # peer -> seconds since the last handshake; null: never; absent: not reported
                "handshakes": {p: (None if a == NEVER else a) for p, a in sorted(self.handshakes.items())}}


@dataclass(frozen=True, slots=True)
class RegionView:
    name: str
    display_name: str
    latitude: float
    longitude: float
    gateways: int
    gateways_alive: int
    gateways_draining: int
    instances: int
    instances_healthy: int
    apps: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "display_name": self.display_name, "latitude": self.latitude,
                "longitude": self.longitude, "gateways": self.gateways, "gateways_alive": self.gateways_alive,
                "gateways_draining": self.gateways_draining, "instances": self.instances,
                "instances_healthy": self.instances_healthy, "apps": list(self.apps)}


@dataclass(frozen=True, slots=True)
class CertificateView:
    """A certificate the coordinators obtain (ACME): expiry, next attempt, failures in a row."""

    name: str
    serial: str
    not_after: int
    renew_at: int
    failures: int
    last_error: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "serial": self.serial, "not_after": self.not_after, "renew_at": self.renew_at,
                "failures": self.failures, "last_error": self.last_error}


@dataclass(frozen=True, slots=True)
class View:
    revision: int
    regions: tuple[RegionView, ...]
    gateways: tuple[GatewayView, ...]
    links_total: int
    links_up: int
    apps: int
    domains: int
    cut_off_regions: tuple[str, ...] = ()
    panic_held: tuple[str, ...] = ()
    certificates: tuple[CertificateView, ...] = ()
    by_name: dict[str, GatewayView] = field(default_factory=dict, compare=False, repr=False)

    def gateway(self, name: str) -> GatewayView | None:
        return self.by_name.get(name)

    def region_names(self) -> list[str]:
        """Regions with coordinates, then any region only named by a gateway."""
        names = [r.name for r in self.regions]
        extra = sorted({g.region for g in self.gateways} - set(names))
        return names + extra

    def as_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "regions": [r.as_json() for r in self.regions],
                "gateways": [g.as_json() for g in self.gateways], "links_total": self.links_total,
                "links_up": self.links_up, "apps": self.apps, "domains": self.domains,
                "cut_off_regions": list(self.cut_off_regions), "panic_held": list(self.panic_held),
                "matrix": matrix(self), "app_regions": app_regions(self),
                "certificates": [c.as_json() for c in self.certificates]}


EMPTY = View(revision=0, regions=(), gateways=(), links_total=0, links_up=0, apps=0, domains=0)


def view_of(overview: pb.Overview) -> View:
    gateways = tuple(GatewayView(
        name=g.name, region=g.region, session=SESSION_NAMES.get(g.session, "unknown"), reachable=g.reachable,
        seen_by=tuple(g.seen_by), down_by=tuple(g.down_by), probe_rtt_ms=g.probe_rtt_ms, draining=g.draining,
        in_dns=g.in_dns, load=g.load, active_connections=g.active_connections, version=g.version,
        handshakes={p.name: (p.age_seconds if p.age_seconds > 0 else NEVER) for p in g.peers})
        for g in overview.gateways)
    regions = tuple(RegionView(
        name=r.region.name, display_name=r.region.display_name, latitude=r.region.latitude,
        longitude=r.region.longitude, gateways=r.gateways, gateways_alive=r.gateways_alive,
        gateways_draining=r.gateways_draining, instances=r.instances, instances_healthy=r.instances_healthy,
        apps=tuple(r.apps)) for r in overview.regions)
    return View(revision=overview.revision, regions=regions, gateways=gateways, links_total=overview.links_total,
                links_up=overview.links_up, apps=overview.apps, domains=overview.domains,
                cut_off_regions=tuple(overview.cut_off_regions), panic_held=tuple(overview.panic_held),
                certificates=tuple(CertificateView(c.name, c.serial, c.not_after, c.renew_at, c.failures, c.last_error)
                                   for c in overview.certificates),
                by_name={g.name: g for g in gateways})


def pair_age(a: GatewayView, b: GatewayView) -> float | None:
    """The worse handshake age of what `a` reported about `b` and `b` about `a` (NEVER: never),
    None when neither reported the other."""
    ages = [x for x in (a.handshakes.get(b.name), b.handshakes.get(a.name)) if x is not None]
    return max(ages, default=None)


def age_class(age: float | None) -> str:
    """A handshake age's colour: none (not reported), ok (fresh), warn (stale), bad (too old or never)."""
    if age is None:
        return "none"
    if age <= HANDSHAKE_FRESH:
        return "ok"
    return "warn" if age <= HANDSHAKE_STALE else "bad"


def ratio_class(up: int, total: int) -> str:
    if total == 0:
        return "none"
    if up == total:
        return "ok"
    return "bad" if up == 0 else "warn"


def cell_class(up: int, pairs: int, worst_age: float | None) -> str:
    """A matrix cell's colour: by the worst handshake age of its pairs when any was reported,
    else by the share of its links whose both ends are alive and reachable."""
    return ratio_class(up, pairs) if worst_age is None or pairs == 0 else age_class(worst_age)


def _json_age(age: float | None) -> float | str | None:
    return "never" if age == NEVER else age


def matrix(view: View) -> dict[str, Any]:
    """Mesh links aggregated per region pair: for each pair (a <= b) the number of gateway pairs,
    how many have both ends alive and reachable, and the worst handshake age reported for any
    of them ("never", seconds, or null: none reported). Links up are O(regions^2) from
    per-region counts; ages cost one step per reported handshake. The page drills down per
    gateway pair on click."""
    names = view.region_names()
    order = {r: i for i, r in enumerate(names)}
    total = {r: 0 for r in names}
    ok = {r: 0 for r in names}
    for g in view.gateways:
        total[g.region] += 1
        ok[g.region] += g.link_ok
    worst: dict[tuple[str, str], float] = {}
    for g in view.gateways:
        for peer, age in g.handshakes.items():
            other = view.gateway(peer)
            if other is None or other.name == g.name:
                continue
            key = (g.region, other.region) if order[g.region] <= order[other.region] else (other.region, g.region)
            worst[key] = max(worst.get(key, 0.0), age)
    cells = []
    for i, a in enumerate(names):
        for b in names[i:]:
            pairs = total[a] * (total[a] - 1) // 2 if a == b else total[a] * total[b]
            up = ok[a] * (ok[a] - 1) // 2 if a == b else ok[a] * ok[b]
            age = worst.get((a, b))
            cells.append({"a": a, "b": b, "pairs": pairs, "up": up, "worst_age": _json_age(age),
                          "class": cell_class(up, pairs, age)})
    return {"regions": names, "cells": cells}


def app_regions(view: View) -> dict[str, list[str]]:
    """app -> the regions that host one of its instances (from each region's overview)."""
    out: dict[str, list[str]] = {}
    for r in view.regions:
        for app in r.apps:
            out.setdefault(app, []).append(r.name)
    return {app: sorted(regions) for app, regions in sorted(out.items())}


@dataclass(frozen=True, slots=True)
class Event:
    at: float  # unix time the change was seen
    kind: str  # joined, left, session, reachability, draining, dns, failover, recovered, region, certificate
    subject: str
    text: str

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "subject": self.subject, "text": self.text}


def _dns_regions(view: View) -> set[str]:
    return {g.region for g in view.gateways if g.in_dns}


def events_between(old: View, new: View, at: float) -> list[Event]:
    """What changed from `old` to `new`, as feed events (in a stable order). Nothing from `EMPTY`:
    the first overview is the starting point, not a thousand gateways joining."""
    if old is EMPTY:
        return []
    out: list[Event] = []
    old_regions = {r.name for r in old.regions}
    new_regions = {r.name for r in new.regions}
    for r in sorted(new_regions - old_regions):
        out.append(Event(at, "region", r, f"region {r} added"))
    for r in sorted(old_regions - new_regions):
        out.append(Event(at, "region", r, f"region {r} removed"))
    for g in new.gateways:
        before = old.gateway(g.name)
        if before is None:
            out.append(Event(at, "joined", g.name, f"gateway {g.name} joined region {g.region} (session {g.session})"))
            continue
        if before.session != g.session:
            out.append(Event(at, "session", g.name, f"gateway {g.name}: session {before.session} -> {g.session}"))
        if before.reachable != g.reachable:
            verdict = "reachable" if g.reachable else f"unreachable (down by {', '.join(g.down_by) or '-'})"
            out.append(Event(at, "reachability", g.name, f"gateway {g.name} is now {verdict}"))
        if before.draining != g.draining:
            out.append(Event(at, "draining", g.name,
                             f"gateway {g.name} {'is draining' if g.draining else 'is active again'}"))
        if before.in_dns != g.in_dns:
            out.append(Event(at, "dns", g.name, f"gateway {g.name} {'back in' if g.in_dns else 'out of'} DNS answers"))
    for g in old.gateways:
        if new.gateway(g.name) is None:
            out.append(Event(at, "left", g.name, f"gateway {g.name} left region {g.region}"))
    had, has = _dns_regions(old), _dns_regions(new)
    for r in sorted(had - has):
        if r in new_regions or any(g.region == r for g in new.gateways):
            out.append(Event(at, "failover", r, f"region {r} has no gateway in DNS: users fail over to other regions"))
    for r in sorted(has - had):
        if r in old_regions or any(g.region == r for g in old.gateways):
            out.append(Event(at, "recovered", r, f"region {r} is answered in DNS again"))
    old_apps, new_apps = app_regions(old), app_regions(new)
    for app in sorted(set(old_apps) | set(new_apps)):
        if old_apps.get(app, []) != new_apps.get(app, []):
            where = ", ".join(new_apps.get(app, [])) or "no region"
            out.append(Event(at, "apps", app, f"app {app} now runs in {where}"))
    out.extend(_certificate_events(old, new, at))
    return out


def _certificate_events(old: View, new: View, at: float) -> list[Event]:
    """Obtained, renewed (a new serial), failing (failures in a row start), recovered."""
    out: list[Event] = []
    before = {c.name: c for c in old.certificates}
    for c in new.certificates:
        prev = before.get(c.name)
        expiry = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(c.not_after)) if c.not_after else "-"
        if c.serial and (prev is None or not prev.serial):
            out.append(Event(at, "certificate", c.name, f"certificate {c.name} obtained (serial {c.serial}, "
                                                        f"expires {expiry})"))
        elif prev is not None and c.serial != prev.serial:
            out.append(Event(at, "certificate", c.name, f"certificate {c.name} renewed (serial {c.serial}, "
                                                        f"expires {expiry})"))
        if c.failures > 0 and (prev is None or prev.failures == 0):
            out.append(Event(at, "certificate", c.name, f"obtaining certificate {c.name} failed: {c.last_error}"))
    return out


def trim(events: Iterable[Event], limit: int = MAX_EVENTS) -> list[Event]:
    """The newest `limit` events, newest last."""
    kept = list(events)
    return kept[-limit:]

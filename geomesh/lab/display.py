"""The lab's live view: regions and gateways with health, the reachability matrix, mesh links
with their last handshake, and the app-to-region map, as rich tables built from the
coordinator's Admin API only (the handshake ages are what each gateway reported in its
heartbeats, `GatewayHealth.peers`; the lab meets the services only at their ports).

The reachability matrix comes from `Admin/GetOverview`'s `gateways`: per gateway its session
state (open, timed out, closed), the coordinator's verdict, the regions whose probers reach it
and those whose probers do not, the last probe RTT and whether GeoDNS answers it; under it the
prober regions found cut off (their votes do not count) and the gateways the panic threshold
holds in DNS.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.lab.runner import Lab


def handshakes(overview: pb.Overview) -> dict[tuple[str, str], float | None]:
    """(gateway, peer name) -> seconds since their last handshake as the gateway reported it
    (None: never); pairs a gateway did not report are absent."""
    return {(g.name, p.name): (p.age_seconds if p.age_seconds > 0 else None)
            for g in overview.gateways for p in g.peers}


SESSION_TEXT = {pb.SESSION_STATE_OPEN: "[green]open[/green]", pb.SESSION_STATE_TIMED_OUT: "[yellow]timed out[/yellow]",
                pb.SESSION_STATE_CLOSED: "[red]closed[/red]"}


def reachability_table(overview: pb.Overview) -> Table:
    """The reachability matrix: one row per gateway, cut-off regions and panic-held gateways in the caption."""
    rt = Table(title="reachability (outside-in probes, decided by quorum of regions)", title_justify="left",
               caption_justify="left")
    for col in ("gateway", "region", "session", "verdict", "seen by", "not seen by", "probe rtt", "in dns"):
        rt.add_column(col)
    for g in overview.gateways:
        verdict = "[green]reachable[/green]" if g.reachable else "[red]unreachable[/red]"
        rtt = f"{g.probe_rtt_ms:.1f} ms" if g.probe_rtt_ms > 0 else "-"
        rt.add_row(g.name, g.region, SESSION_TEXT.get(g.session, "?"), verdict + (" (draining)" if g.draining else ""),
                   ", ".join(g.seen_by) or "-", ", ".join(g.down_by) or "-", rtt,
                   "[green]yes[/green]" if g.in_dns else "[red]no[/red]")
    cut = ", ".join(overview.cut_off_regions) or "none"
    held = ", ".join(overview.panic_held) or "none"
    rt.caption = f"cut-off prober regions: {cut}    held by the panic threshold: {held}"
    return rt


async def snapshot(lab: Lab) -> Group:
    async with client_channel(lab.cp.address, lab.cp.pki.identity("admin", "lab-admin")) as ch:
        admin = pbg.AdminStub(ch)
        gateways = list((await admin.ListGateways(pb.ListGatewaysRequest(), timeout=5)).gateways)
        regions = {r.name: r for r in (await admin.ListRegions(pb.Empty(), timeout=5)).regions}
        instances = list((await admin.ListInstances(pb.ListInstancesRequest(), timeout=5)).instances)
        overview = await admin.GetOverview(pb.Empty(), timeout=5)
    gt = Table(title="regions and gateways", title_justify="left")
    for col in ("region", "location", "gateway", "public ip", "mesh ip", "state", "alive"):
        gt.add_column(col)
    for g in sorted(gateways, key=lambda g: g.region):
        r = regions.get(g.region)
        loc = f"{r.latitude:.1f},{r.longitude:.1f}" if r else "?"
        state = "draining" if g.state == pb.GATEWAY_STATE_DRAINING else "active"
        gt.add_row(g.region, loc, g.name, g.public_ip, g.mesh_ip, state,
                   "[green]yes[/green]" if g.alive else "[red]no[/red]")
    hs = handshakes(overview)
    mt = Table(title="mesh links (WireGuard)" + ("" if lab.plan.netns else " — computed, not created (loopback mode)"),
               title_justify="left")
    for col in ("a", "b", "last handshake a→b", "up"):
        mt.add_column(col)
    for i, a in enumerate(gateways):
        for b in gateways[i + 1:]:
            age = hs.get((a.name, b.name), "n/a")
            text = "n/a" if age == "n/a" else ("never" if age is None else f"{age:.0f}s ago")
            mt.add_row(a.name, b.name, text, "[green]yes[/green]" if a.alive and b.alive else "[red]no[/red]")
    at = Table(title="apps", title_justify="left")
    for col in ("app", "region", "instances (healthy/total)"):
        at.add_column(col)
    seen: dict[tuple[str, str], list[bool]] = {}
    for inst in instances:
        seen.setdefault((inst.app, inst.region), []).append(inst.healthy)
    for (app, region), health in sorted(seen.items()):
        at.add_row(app, region, f"{sum(health)}/{len(health)}")
    return Group(gt, reachability_table(overview), mt, at)

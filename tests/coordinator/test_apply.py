"""`geomesh apply` against a real coordinator over mTLS: apply twice (1 then 0), --dry-run changes
nothing, --prune removes what the files no longer declare, errors exit 2 naming file and field;
and the pure diff as a table."""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path

import pytest

from geomesh import apply
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.model import App, Instance, Region

ROOT = Path(__file__).resolve().parents[2]

EU = """
name = "eu-central"
display_name = "EU Central"
latitude = 50.11
longitude = 8.68
instance_subnet = "10.90.2.0/24"

[[gateways]]
name = "gw-eu-central-1"
public_ip = "192.0.2.21"
public_ips = ["2001:db8::21"]
wg_port = 51820
proxy_port = 8080

[[apps]]
name = "shop"
lb_policy = "least_connections"
pinned_regions = ["eu-central"]
ports = [8443]

[[instances]]
app = "shop"
id = "shop-eu-1"
address = "10.90.2.11"
port = 8000

[[domains]]
fqdn = "www.shop.example"
app = "shop"
"""

US = """
name = "us-east"
latitude = 39.04
longitude = -77.49

[[instances]]
app = "shop"
id = "shop-us-1"
address = "10.91.0.5"
port = 8000
"""


def _args(coordinator, paths: list[Path], *flags: str) -> argparse.Namespace:
    ident = coordinator.pki.identity("admin", "apply-admin")
    ns = argparse.ArgumentParser()
    sub = ns.add_subparsers(dest="cmd")
    apply.add_parser(sub)
    return ns.parse_args(["apply", *map(str, paths), "--coordinator", coordinator.address,
                          "--pki-dir", str(coordinator.pki.dir), "--identity", ident.name, *flags])


async def _apply(coordinator, paths: list[Path], *flags: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    try:
        code = await apply.run(_args(coordinator, paths, *flags), say=lines.append)
    except (ValidationError, apply.ApplyError) as exc:
        return apply.EXIT_ERROR, [*lines, str(exc)]
    return code, lines


async def _state(admin) -> dict[str, list[str]]:
    return {
        "regions": [r.name for r in (await admin.ListRegions(pb.Empty())).regions],
        "apps": [f"{a.name}:{a.lb_policy}:{list(a.pinned_regions)}" for a in (await admin.ListApps(pb.Empty())).apps],
        "instances": [f"{i.app}/{i.id}@{i.region}:{i.address}:{i.port}"
                      for i in (await admin.ListInstances(pb.ListInstancesRequest())).instances],
        "domains": [d.fqdn for d in (await admin.ListDomains(pb.Empty())).domains],
        "enrollments": [f"{e.name}@{e.region}:{sorted(e.public_ips)}"
                        for e in (await admin.ListEnrollments(pb.Empty())).enrollments],
    }


async def test_apply_twice_dry_run_and_prune(coordinator, tmp_path):
    admin = coordinator.admin()
    eu, us = tmp_path / "eu.toml", tmp_path / "us.toml"
    eu.write_text(EU)
    us.write_text(US)
    empty = await _state(admin)

    code, lines = await _apply(coordinator, [tmp_path], "--dry-run")
    assert code == apply.EXIT_CHANGED and "+ region eu-central" in lines, lines
    assert await _state(admin) == empty  # a dry run changes nothing

    code, lines = await _apply(coordinator, [tmp_path])
    assert code == apply.EXIT_CHANGED, lines
    assert lines[:2] == ["+ region eu-central", "+ region us-east"]
    state = await _state(admin)
    assert state["instances"] == ["shop/shop-eu-1@eu-central:10.90.2.11:8000", "shop/shop-us-1@us-east:10.91.0.5:8000"]
    assert state["enrollments"] == ["gw-eu-central-1@eu-central:['192.0.2.21', '2001:db8::21']"]
    assert state["domains"] == ["www.shop.example"]

    code, lines = await _apply(coordinator, [eu, us])  # idempotent
    assert (code, lines) == (apply.EXIT_UNCHANGED, ["no changes"])

    # a change in place, a replaced instance, and something the files never declared
    await admin.CreateApp(pb.App(name="extra"))
    eu.write_text(EU.replace('"least_connections"', '"ip_hash"').replace("10.90.2.11", "10.90.2.12"))
    code, lines = await _apply(coordinator, [tmp_path])
    assert code == apply.EXIT_CHANGED
    assert "~ app shop: lb_policy <LbPolicy.LEAST_CONNECTIONS: 'least_connections'> -> <LbPolicy.IP_HASH: 'ip_hash'>" \
        in lines or any(x.startswith("~ app shop: lb_policy") for x in lines), lines
    assert any(x.startswith("+ instance shop/shop-eu-1: address '10.90.2.11' -> '10.90.2.12'") for x in lines), lines
    assert "extra" in str((await _state(admin))["apps"])  # no --prune: kept

    us.unlink()
    code, lines = await _apply(coordinator, [tmp_path], "--prune", "--dry-run")
    assert code == apply.EXIT_CHANGED and "- region us-east" in lines and "- app extra" in lines, lines
    assert "us-east" in (await _state(admin))["regions"]
    code, lines = await _apply(coordinator, [tmp_path], "--prune")
    assert code == apply.EXIT_CHANGED, lines
    assert lines.index("- instance shop/shop-us-1") < lines.index("- region us-east")
    state = await _state(admin)
    assert state["regions"] == ["eu-central"] and "extra" not in str(state["apps"])
    assert (await _apply(coordinator, [tmp_path], "--prune"))[0] == apply.EXIT_UNCHANGED


@pytest.mark.parametrize("text, where", [
    (EU.replace('address = "10.90.2.11"', 'address = "fe80::1%eth0"'), "eu.toml: instances[0].address"),
    (EU.replace('lb_policy = "least_connections"', 'lb_policy = "fastest"'), "eu.toml: apps[0].lb_policy"),
    (EU.replace('latitude = 50.11', 'latitude = 91'), "eu.toml: latitude"),
    (EU.replace('public_ip = "192.0.2.21"', 'public_ip = "192.0.2.300"'), "eu.toml: gateways[0].public_ip"),
    (EU.replace('fqdn = "www.shop.example"', 'fqdn = "localhost"'), "eu.toml: domains[0].fqdn"),
    (EU.replace('port = 8000', 'prot = 8000'), "eu.toml: instances[0].prot"),
    (EU + '\n[[apps]]\nname = "shop"\n', "eu.toml: apps[1]"),
    (EU.replace('app = "shop"\nid', 'app = "nope"\nid'), "eu.toml: instances[0].app"),
    (EU.replace('pinned_regions = ["eu-central"]', 'pinned_regions = ["mars"]'), "eu.toml: apps[0].pinned_regions[0]"),
    ("name = [", "eu.toml"),
])
async def test_errors_exit_2_naming_file_and_field(coordinator, tmp_path, text, where):
    (tmp_path / "eu.toml").write_text(text)
    code, lines = await _apply(coordinator, [tmp_path])
    assert code == apply.EXIT_ERROR
    assert any(where in x for x in lines), lines
    assert not (await coordinator.admin().ListRegions(pb.Empty())).regions  # nothing was changed


async def test_a_refusal_by_the_coordinator_exits_2_naming_the_entry(coordinator, tmp_path):
    (tmp_path / "eu.toml").write_text(EU.replace("10.90.2.11", "127.0.0.1"))  # no --allow-loopback-instances
    code, lines = await _apply(coordinator, [tmp_path])
    assert code == apply.EXIT_ERROR
    assert "instance shop/shop-eu-1 (eu.toml: instances[0]): INVALID_ARGUMENT: address:" in lines[-1], lines


def test_the_command_line_exit_codes(coordinator, tmp_path):
    """The real `geomesh apply` process: 1, then 0, then 2 for a missing identity."""
    import subprocess
    import sys

    (tmp_path / "eu.toml").write_text(EU)
    ident = coordinator.pki.identity("admin", "cli-admin")
    base = [sys.executable, "-m", "geomesh.cli", "apply", str(tmp_path), "--coordinator", coordinator.address]
    creds = ["--ca", str(ident.ca), "--cert", str(ident.cert), "--key", str(ident.key)]
    first = subprocess.run(base + creds, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert first.returncode == 1, first.stderr
    second = subprocess.run(base + creds, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (second.returncode, second.stdout.strip()) == (0, "no changes"), second.stderr
    bad = subprocess.run(base + ["--pki-dir", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert bad.returncode == 2 and "--pki-dir" in bad.stderr


def test_the_shipped_region_files_load():
    declared = apply.load([ROOT / "deploy" / "regions"])
    assert set(declared.regions) == {"us-east", "eu-central", "ap-northeast"}
    assert {e.region for e in declared.enrollments.values()} == set(declared.regions)


def test_diff_table():
    want, have = apply.Declared(), apply.Declared()
    r = Region("eu", 1, 1)
    want.regions = {"eu": r}
    want.apps = {"web": App("web")}
    want.instances = {"web/i1": Instance("web", "i1", "eu", "10.0.0.1", 80)}
    want.source = {("regions", "eu"): "a.toml", ("apps", "web"): "a.toml: apps[0]",
                   ("instances", "web/i1"): "a.toml: instances[0]"}
    assert [c.line() for c in apply.diff(want, have).changes] == ["+ region eu", "+ app web", "+ instance web/i1"]
    have.regions = {"eu": Region("eu", 2, 1), "old": Region("old", 0, 0)}
    have.apps = {"web": App("web")}
    have.instances = {"web/i1": Instance("web", "i1", "eu", "10.0.0.1", 80, healthy=False)}  # health is not compared
    plan = apply.diff(want, have, prune=True)
    assert [c.line() for c in plan.changes] == ["- region old"]
    assert plan.conflicts and "latitude 2.0 -> 1.0" in plan.conflicts[0] and "a.toml" in plan.conflicts[0]


def test_apply_runs_quickly_enough_to_be_idempotent_in_a_loop(coordinator, tmp_path):
    (tmp_path / "eu.toml").write_text(EU)
    (tmp_path / "us.toml").write_text(US)
    codes = [asyncio.run(_apply(coordinator, [tmp_path]))[0] for _ in range(3)]
    assert codes == [1, 0, 0]


@pytest.fixture(autouse=True)
def _no_leftover_files(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)

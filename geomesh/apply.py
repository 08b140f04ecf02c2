"""`geomesh apply PATH...`: make the coordinator's state what TOML files declare.

The files are the `deploy/regions` format, extended (see deploy/README.md, "Declaring state"): a
file may declare a region (top-level `name`, `latitude`, ...), its gateways' enrollment
(`[[gateways]]`: name and allowed public addresses), apps (`[[apps]]`: lb_policy, pinned_regions,
ports), instances (`[[instances]]`, in the file's region unless they name one) and custom domains
(`[[domains]]`). A directory stands for its `*.toml` files.

Pure core, thin I/O: `load` parses and validates the files into `Declared` (every error names the
file and the field), `fetch` reads the coordinator's state into the same shape, `diff` compares
them into an ordered list of `Change`s (and the conflicts that no call can fix, e.g. a region
whose coordinates changed: regions are not updated in place), `execute` makes the calls.
Idempotent: applying the same files twice changes nothing the second time. Without `--prune`
nothing is deleted; with it, whatever the files do not declare goes (instances and domains
before apps, apps and enrollments before regions). Exit status: 0 no change, 1 changed (with
`--dry-run`: would change), 2 error (nothing is changed when the files or the plan are wrong; a
call the coordinator refuses stops the run and names the file entry and the field).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.errors import ValidationError
from geomesh.model import App, Domain, Instance, LbPolicy, Region

EXIT_UNCHANGED, EXIT_CHANGED, EXIT_ERROR = 0, 1, 2
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_ADDRESSES = 16
_REGION_KEYS = {"name", "display_name", "latitude", "longitude", "instance_subnet"}
_TOP_KEYS = _REGION_KEYS | {"gateways", "apps", "instances", "domains"}
_GATEWAY_KEYS = {"name", "public_ip", "public_ipv6", "public_ips", "wg_port", "proxy_port", "https_port"}
_APP_KEYS = {"name", "lb_policy", "pinned_regions", "ports"}
_INSTANCE_KEYS = {"app", "id", "region", "address", "port"}
_DOMAIN_KEYS = {"fqdn", "app", "port"}
_LB_TO_PB = {LbPolicy.ROUND_ROBIN: pb.LB_POLICY_ROUND_ROBIN, LbPolicy.LEAST_CONNECTIONS: pb.LB_POLICY_LEAST_CONNECTIONS,
             LbPolicy.IP_HASH: pb.LB_POLICY_IP_HASH}


# -- what the files declare ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Enrollment:
    """A gateway's enrollment: the region it registers in and the public addresses it may use."""

    name: str
    region: str
    public_ips: tuple[str, ...]


@dataclass(slots=True)
class Declared:
    """A whole state: each object by its key, with where it was declared (`source`)."""

    regions: dict[str, Region] = field(default_factory=dict)
    enrollments: dict[str, Enrollment] = field(default_factory=dict)
    apps: dict[str, App] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)  # "<app>/<id>"
    domains: dict[str, Domain] = field(default_factory=dict)
    source: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, key) -> "file: table[i]"

    def declare(self, kind: str, key: str, value: Any, source: str) -> None:
        """Add an object (`kind`: regions, enrollments, apps, instances, domains); twice is an error."""
        table = getattr(self, kind)
        if key in table:
            raise ValidationError(source, f"{kind[:-1]} {key!r} is declared twice (also in {self.source[(kind, key)]})")
        table[key] = value
        self.source[(kind, key)] = source


def _table(data: dict, name: str, where: str) -> list[dict]:
    items = data.get(name, [])
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise ValidationError(f"{where}{name}", "must be an array of tables ([[" + name + "]])")
    return items


def _unknown(item: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(item) - allowed)
    if extra:
        raise ValidationError(f"{where}{extra[0]}", f"is not a known field (known: {', '.join(sorted(allowed))})")


def _add(declared: Declared, kind: str, key: str, value: Any, where: str) -> None:
    declared.declare(kind, key, value, where)


def _parse_file(path: Path, declared: Declared) -> None:
    label = path.name
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValidationError(label, f"is larger than {MAX_FILE_BYTES} bytes")
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(label, f"is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(label, f"cannot be read: {exc}") from None
    where = ""
    try:
        _unknown(data, _TOP_KEYS, "")
        region_name = ""
        if "name" in data:
            region = Region(name=data["name"], latitude=data.get("latitude", float("nan")),
                            longitude=data.get("longitude", float("nan")),
                            display_name=data.get("display_name", ""), instance_subnet=data.get("instance_subnet", ""))
            region_name = region.name
            _add(declared, "regions", region.name, region, label)
        elif _REGION_KEYS & set(data):
            raise ValidationError("name", "is required when a file declares a region")
        for i, g in enumerate(_table(data, "gateways", "")):
            where = f"gateways[{i}]."
            _unknown(g, _GATEWAY_KEYS, where)
            if not region_name:
                raise ValidationError(f"{where}name", "gateways are declared in their region's file")
            name = validate.dns_label(f"{where}name", g.get("name", ""))
            ips = [validate.ip_address(f"{where}public_ip", g.get("public_ip", ""), version=4)]
            if g.get("public_ipv6"):
                ips.append(validate.ip_address(f"{where}public_ipv6", g["public_ipv6"], version=6))
            extra = g.get("public_ips", [])
            if not isinstance(extra, list):
                raise ValidationError(f"{where}public_ips", "must be a list of addresses")
            ips += [validate.ip_address(f"{where}public_ips[{k}]", a) for k, a in enumerate(extra)]
            ips = list(dict.fromkeys(ips))
            if len(ips) > MAX_ADDRESSES:
                raise ValidationError(f"{where}public_ips", f"has {len(ips)} addresses, at most {MAX_ADDRESSES}")
            for port_field in ("wg_port", "proxy_port", "https_port"):  # host facts: checked, not sent
                if port_field in g:
                    validate.port(f"{where}{port_field}", g[port_field], allow_zero=port_field == "https_port")
            _add(declared, "enrollments", name, Enrollment(name, region_name, tuple(sorted(ips))), f"{label}: {where[:-1]}")
        for i, a in enumerate(_table(data, "apps", "")):
            where = f"apps[{i}]."
            _unknown(a, _APP_KEYS, where)
            try:
                app = App(name=a.get("name", ""), lb_policy=a.get("lb_policy", "round_robin"),
                          pinned_regions=tuple(a.get("pinned_regions", ())), ports=tuple(a.get("ports", ())))
            except TypeError:
                raise ValidationError(f"{where}pinned_regions", "pinned_regions and ports must be lists") from None
            _add(declared, "apps", app.name, app, f"{label}: {where[:-1]}")
        for i, x in enumerate(_table(data, "instances", "")):
            where = f"instances[{i}]."
            _unknown(x, _INSTANCE_KEYS, where)
            region = x.get("region", region_name)
            if not region:
                raise ValidationError(f"{where}region", "is required outside a region's file")
            inst = Instance(app=x.get("app", ""), id=x.get("id", ""), region=region, address=x.get("address", ""),
                            port=x.get("port", 0))
            _add(declared, "instances", inst.key, inst, f"{label}: {where[:-1]}")
        for i, d in enumerate(_table(data, "domains", "")):
            where = f"domains[{i}]."
            _unknown(d, _DOMAIN_KEYS, where)
            domain = Domain(fqdn=d.get("fqdn", ""), app=d.get("app", ""), port=d.get("port", 0))
            _add(declared, "domains", domain.fqdn, domain, f"{label}: {where[:-1]}")
    except ValidationError as exc:
        name = exc.field if exc.field.startswith(label) else f"{label}: {where if not exc.field.startswith(where) else ''}{exc.field}"
        raise ValidationError(name, exc.message) from None


def files_of(paths: Iterable[Path]) -> list[Path]:
    """The files named, a directory standing for its *.toml files (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.toml"))
            if not found:
                raise ValidationError(str(p), "has no *.toml files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValidationError(str(p), "does not exist")
    return out


def load(paths: Iterable[Path]) -> Declared:
    """Parse and check every file (references to regions and apps are checked by `diff`, which
    also knows what the coordinator has)."""
    declared = Declared()
    for path in files_of(paths):
        _parse_file(path, declared)
    return declared


def dangling_references(want: Declared, have: Declared, *, prune: bool) -> list[str]:
    """References the files make to regions and apps that will not exist: declared nowhere and
    (or, with --prune, about to be deleted from) not on the coordinator. Each names its file and field."""
    regions = set(want.regions) | (set() if prune else set(have.regions))
    apps = set(want.apps) | (set() if prune else set(have.apps))
    out = []
    for k, inst in sorted(want.instances.items()):
        where = want.source[("instances", k)]
        if inst.app not in apps:
            out.append(f"{where}.app: app {inst.app!r} is not declared (nor on the coordinator)")
        if inst.region not in regions:
            out.append(f"{where}.region: region {inst.region!r} is not declared (nor on the coordinator)")
    for k, d in sorted(want.domains.items()):
        if d.app not in apps:
            out.append(f"{want.source[('domains', k)]}.app: app {d.app!r} is not declared (nor on the coordinator)")
    for k, app in sorted(want.apps.items()):
        for i, r in enumerate(app.pinned_regions):
            if r not in regions:
                out.append(f"{want.source[('apps', k)]}.pinned_regions[{i}]: region {r!r} is not declared "
                           "(nor on the coordinator)")
    return out


# -- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Change:
    """One call: `op` is + (create), ~ (update in place), - (delete); `source` where it was declared."""

    op: str
    kind: str
    key: str
    detail: str = ""
    value: Any = None
    source: str = ""

    def line(self) -> str:
        return f"{self.op} {self.kind} {self.key}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True, slots=True)
class Plan:
    changes: tuple[Change, ...]
    conflicts: tuple[str, ...]  # differences no call can make (printed; exit 2, nothing changed)


def _fields(a: object, b: object, names: Iterable[str]) -> str:
    return ", ".join(f"{n} {getattr(b, n)!r} -> {getattr(a, n)!r}" for n in names if getattr(a, n) != getattr(b, n))


def diff(want: Declared, have: Declared, *, prune: bool = False) -> Plan:
    """The calls that make `have` what `want` declares, in an order the coordinator accepts."""
    conflicts: list[str] = dangling_references(want, have, prune=prune)
    creates_r, enrolls, apps_up, removals, adds, deletes_a, unenrolls, deletes_r = ([] for _ in range(8))
    for name, r in sorted(want.regions.items()):
        current = have.regions.get(name)
        if current is None:
            creates_r.append(Change("+", "region", name, value=r, source=want.source[("regions", name)]))
        elif current != r:
            conflicts.append(f"{want.source[('regions', name)]}: region {name}: "
                             f"{_fields(r, current, ('latitude', 'longitude', 'display_name', 'instance_subnet'))}: "
                             "regions are not updated in place (delete it, with everything in it, and apply again)")
    for name, e in sorted(want.enrollments.items()):
        current = have.enrollments.get(name)
        if current != e:
            detail = "" if current is None else _fields(e, current, ("region", "public_ips"))
            enrolls.append(Change("+" if current is None else "~", "enrollment", name, detail, e,
                                  want.source[("enrollments", name)]))
    for name, app in sorted(want.apps.items()):
        current = have.apps.get(name)
        if current is None:
            apps_up.append(Change("+", "app", name, value=app, source=want.source[("apps", name)]))
        elif (current.lb_policy, current.pinned_regions, current.ports) != (app.lb_policy, app.pinned_regions, app.ports):
            apps_up.append(Change("~", "app", name, _fields(app, current, ("lb_policy", "pinned_regions", "ports")),
                                  app, want.source[("apps", name)]))
    for kind, fields_ in (("instances", ("region", "address", "port")), ("domains", ("app", "port"))):
        for k, obj in sorted(getattr(want, kind).items()):
            current = getattr(have, kind).get(k)
            if current is None:
                adds.append(Change("+", kind[:-1], k, value=obj, source=want.source[(kind, k)]))
            elif _fields(obj, current, fields_):
                # no update call for these: replaced (removed, then added)
                removals.append(Change("-", kind[:-1], k, "replaced", current, want.source[(kind, k)]))
                adds.append(Change("+", kind[:-1], k, _fields(obj, current, fields_), obj, want.source[(kind, k)]))
    if prune:
        for kind in ("instances", "domains"):
            for k in sorted(set(getattr(have, kind)) - set(getattr(want, kind))):
                removals.append(Change("-", kind[:-1], k, value=getattr(have, kind)[k]))
        deletes_a = [Change("-", "app", k) for k in sorted(set(have.apps) - set(want.apps))]
        unenrolls = [Change("-", "enrollment", k) for k in sorted(set(have.enrollments) - set(want.enrollments))]
        deletes_r = [Change("-", "region", k) for k in sorted(set(have.regions) - set(want.regions))]
    changes = (*creates_r, *enrolls, *apps_up, *removals, *adds, *deletes_a, *unenrolls, *deletes_r)
    return Plan(tuple(changes), tuple(conflicts))


# -- I/O: the coordinator --------------------------------------------------------------------

async def fetch(admin: pbg.AdminStub, timeout: float = 10.0) -> Declared:
    """The coordinator's state in the shape of the files (instance health is not compared)."""
    regions, apps, insts, domains, enrolled = await asyncio.gather(
        admin.ListRegions(pb.Empty(), timeout=timeout), admin.ListApps(pb.Empty(), timeout=timeout),
        admin.ListInstances(pb.ListInstancesRequest(), timeout=timeout), admin.ListDomains(pb.Empty(), timeout=timeout),
        admin.ListEnrollments(pb.Empty(), timeout=timeout))
    have = Declared()
    have.regions = {r.name: Region.from_proto(r) for r in regions.regions}
    have.apps = {a.name: App.from_proto(a) for a in apps.apps}
    have.instances = {f"{i.app}/{i.id}": Instance.from_proto(pb.Instance(app=i.app, id=i.id, region=i.region,
                                                                        address=i.address, port=i.port))
                      for i in insts.instances}
    have.domains = {d.fqdn: Domain(d.fqdn, d.app, d.port) for d in domains.domains}
    have.enrollments = {e.name: Enrollment(e.name, e.region, tuple(sorted(e.public_ips))) for e in enrolled.enrollments}
    return have


def _call(admin: pbg.AdminStub, c: Change, have: Declared, timeout: float) -> Awaitable[Any]:
    v = c.value
    if c.kind == "region":
        return admin.CreateRegion(v.to_proto(), timeout=timeout) if c.op == "+" else \
            admin.DeleteRegion(pb.DeleteRequest(name=c.key), timeout=timeout)
    if c.kind == "enrollment":
        if c.op == "-":
            return admin.UnenrollGateway(pb.DeleteRequest(name=c.key), timeout=timeout)
        return admin.EnrollGateway(pb.Enrollment(name=v.name, region=v.region, public_ips=list(v.public_ips)),
                                   timeout=timeout)
    if c.kind == "app":
        if c.op == "+":
            return admin.CreateApp(v.to_proto(), timeout=timeout)
        if c.op == "~":
            return admin.UpdateApp(pb.UpdateAppRequest(app=v.to_proto(), expected_revision=have.apps[c.key].mod_revision),
                                   timeout=timeout)
        return admin.DeleteApp(pb.DeleteRequest(name=c.key), timeout=timeout)
    if c.kind == "instance":
        if c.op == "+":
            return admin.AddInstance(v.to_proto(), timeout=timeout)
        app, _, iid = c.key.partition("/")
        return admin.RemoveInstance(pb.InstanceRef(app=app, id=iid), timeout=timeout)
    if c.op == "+":
        return admin.AddDomain(v.to_proto(), timeout=timeout)
    return admin.RemoveDomain(pb.DeleteRequest(name=c.key), timeout=timeout)


class ApplyError(Exception):
    """A call the coordinator refused: names the change, where it was declared, and the reason."""


async def execute(admin: pbg.AdminStub, plan: Plan, have: Declared, *, say: Callable[[str], None] = print,
                  timeout: float = 10.0) -> int:
    """Make the calls in order; stops at the first refusal (ApplyError). Returns how many were made."""
    done = 0
    for c in plan.changes:
        try:
            await _call(admin, c, have, timeout)
        except grpc.aio.AioRpcError as exc:
            where = f" ({c.source})" if c.source else ""
            raise ApplyError(f"{c.line()}{where}: {exc.code().name}: {exc.details()}") from None
        say(c.line())
        done += 1
    return done


# -- command line ------------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="make the coordinator's regions, enrollments, apps, instances and domains "
                                     "what TOML files declare (deploy/README.md)",
                       description="Print the changes that make the coordinator's state what PATH... declare, and "
                                   "make them. Exit status: 0 no change, 1 changed (--dry-run: would change), "
                                   "2 error.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="TOML file, or a directory of them")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT",
                   help="a coordinator replica (host:port, or unix:PATH)")
    p.add_argument("--pki-dir", type=Path, help="PKI directory holding the admin identity (with --identity)")
    p.add_argument("--identity", default="admin", help="admin identity name in --pki-dir (default %(default)s)")
    p.add_argument("--ca", type=Path, help="CA certificate (instead of --pki-dir)")
    p.add_argument("--cert", type=Path, help="admin client certificate (instead of --pki-dir)")
    p.add_argument("--key", type=Path, help="its private key (instead of --pki-dir)")
    p.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    p.add_argument("--prune", action="store_true",
                   help="also delete what the files do not declare (regions, enrollments, apps, instances, domains)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds (default %(default)s)")
    p.set_defaults(func=main)


def _identity(args: argparse.Namespace):  # noqa: ANN202 - geomesh.pki.Identity
    from geomesh.pki import Identity, Pki

    if args.ca or args.cert or args.key:
        if not (args.ca and args.cert and args.key):
            raise ValidationError("--ca/--cert/--key", "give all three")
        ident = Identity("admin", args.identity, args.ca, args.cert, args.key)
    elif args.pki_dir:
        pki = Pki(args.pki_dir)
        ident = Identity("admin", args.identity, pki.ca_cert_path, pki.dir / "admin" / f"{args.identity}.pem",
                         pki.dir / "admin" / f"{args.identity}.key")
    else:
        raise ValidationError("--pki-dir", "or --ca/--cert/--key is required (an admin identity)")
    for path in (ident.ca, ident.cert, ident.key):
        if not Path(path).is_file():
            raise ValidationError("--pki-dir" if args.pki_dir else "--ca/--cert/--key", f"{path} is not a file")
    return ident


async def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> int:
    from geomesh.channel import client_channel

    want = load(args.paths)
    identity = _identity(args)
    async with client_channel(args.coordinator, identity) as ch:
        admin = pbg.AdminStub(ch)
        have = await fetch(admin, args.timeout)
        plan = diff(want, have, prune=args.prune)
        if plan.conflicts:
            raise ApplyError("nothing changed: " + "; ".join(plan.conflicts))
        if not plan.changes:
            say("no changes")
            return EXIT_UNCHANGED
        if args.dry_run:
            for c in plan.changes:
                say(c.line())
            say(f"{len(plan.changes)} change(s) (dry run: none made)")
            return EXIT_CHANGED
        done = await execute(admin, plan, have, say=say, timeout=args.timeout)
        say(f"{done} change(s) made")
        return EXIT_CHANGED


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args))
    except ValidationError as exc:
        print(f"geomesh apply: {exc}", file=sys.stderr)
    except ApplyError as exc:
        print(f"geomesh apply: {exc}", file=sys.stderr)
    except grpc.aio.AioRpcError as exc:
        print(f"geomesh apply: {args.coordinator}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return EXIT_ERROR

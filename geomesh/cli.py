"""`geomesh`: the umbrella command line.

    geomesh pki init --dir D                      make a CA and the coordinator's certificate (idempotent)
    geomesh pki issue --dir D --role R --name N   issue a client certificate (admin|gateway|dns)
    geomesh pki server --dir D --server-host H    reissue the coordinator's serving certificate
    geomesh pki list --dir D [--coordinator A]    the certificates issued from D (and which are revoked)
    geomesh pki revoke --coordinator A (--serial S | --role R --name N)   revoke, as an admin
    geomesh apply PATH... --coordinator A         make the coordinator's state what TOML files declare
    geomesh lab [up|down|status]                  the multi-region lab (the main job)

The services have their own commands: geomesh-coordinator, geomesh-gateway, geomesh-dns.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

from geomesh.errors import ValidationError
from geomesh.pki import ROLES, Pki


def _admin_call(args: argparse.Namespace, call):  # noqa: ANN001, ANN202 - call(AdminStub, metadata) -> coroutine
    """Run one Admin call against --coordinator as the admin identity --admin of --dir."""
    from geomesh.api import geomesh_pb2_grpc as pbg
    from geomesh.channel import client_channel, insecure_metadata

    async def run():  # noqa: ANN202
        identity = None
        if not args.insecure:
            pki = Pki(args.dir)
            if not (pki.dir / "admin" / f"{args.admin}.pem").exists():
                raise FileNotFoundError(f"no admin identity {args.admin!r} in {pki.dir} (geomesh pki issue --role admin)")
            identity = pki.identity("admin", args.admin)
        async with client_channel(args.coordinator, identity, insecure=args.insecure) as ch:
            metadata = insecure_metadata(None, "admin", args.admin) if args.insecure else ()
            return await call(pbg.AdminStub(ch), metadata)

    return asyncio.run(run())


def _pki_list(args: argparse.Namespace, pki: Pki) -> int:
    from geomesh.api import geomesh_pb2 as pb

    revoked_serials: set[str] = set()
    revoked_names: set[tuple[str, str]] = set()
    if args.coordinator:
        try:
            resp = _admin_call(args, lambda stub, md: stub.ListRevocations(pb.Empty(), metadata=md, timeout=10))
        except grpc.aio.AioRpcError as exc:
            print(f"geomesh pki list: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
        except FileNotFoundError as exc:
            print(f"geomesh pki list: {exc}", file=sys.stderr)
            return 2
        revoked_serials = {r.serial for r in resp.revocations if r.serial}
        revoked_names = {(r.role, r.name) for r in resp.revocations if not r.serial}
    rows = list(pki.issued())
    print(f"{'SERIAL':<40} {'ROLE':<11} {'NAME':<24} {'NOT AFTER':<25} STATUS")
    for c in rows:
        if not args.coordinator:
            status = "-"
        elif c.serial in revoked_serials or (c.role, c.name) in revoked_names:
            status = "revoked"
        else:
            status = "valid"
        print(f"{c.serial:<40} {c.role:<11} {c.name:<24} {c.not_after[:25]:<25} {status}")
    return 0


def _pki_revoke(args: argparse.Namespace) -> int:
    from geomesh.api import geomesh_pb2 as pb

    if bool(args.serial) == bool(args.role or args.name) or bool(args.role) != bool(args.name):
        print("geomesh pki revoke: give --serial, or --role and --name", file=sys.stderr)
        return 2
    request = pb.RevokeIdentityRequest(serial=args.serial or "", role=args.role or "", name=args.name or "",
                                       reason=args.reason)
    try:
        r = _admin_call(args, lambda stub, md: stub.RevokeIdentity(request, metadata=md, timeout=10))
    except grpc.aio.AioRpcError as exc:
        print(f"geomesh pki revoke: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1 if exc.code() == grpc.StatusCode.ALREADY_EXISTS else 2
    except FileNotFoundError as exc:
        print(f"geomesh pki revoke: {exc}", file=sys.stderr)
        return 2
    what = f"serial {r.serial}" if r.serial else f"identity {r.role}/{r.name}"
    print(f"revoked {what} (by {r.revoked_by}): every coordinator replica refuses it now")
    return 0


def _pki(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    if args.pki_cmd == "init":
        made = pki.init()
        print(f"{'created' if made else 'kept existing'} CA {pki.ca_cert_path}")
        server = pki.server(args.server_host)
        print(f"coordinator certificate {server.cert}")
        return 0
    if args.pki_cmd == "server":
        try:
            server = pki.server(args.server_host, force=True)
        except FileNotFoundError as exc:
            print(f"geomesh pki server: {exc}", file=sys.stderr)
            return 2
        print(f"coordinator certificate {server.cert} (copy server/ to the coordinator hosts and restart them)")
        return 0
    if args.pki_cmd == "list":
        return _pki_list(args, pki)
    if args.pki_cmd == "revoke":
        return _pki_revoke(args)
    try:
        ident = pki.issue(args.role, args.name)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"geomesh pki issue: {exc}", file=sys.stderr)
        return 2
    print(f"issued {ident.role} identity {ident.name!r}:\n  cert {ident.cert}\n  key  {ident.key}\n  ca   {ident.ca}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geomesh", description="geomesh: multi-region gateways, WireGuard mesh, GeoDNS")
    sub = p.add_subparsers(dest="cmd", required=True)

    pki = sub.add_parser("pki", help="manage the geomesh CA and identities")
    pki_sub = pki.add_subparsers(dest="pki_cmd", required=True)
    init = pki_sub.add_parser("init", help="create the CA and the coordinator's serving certificate (idempotent)")
    init.add_argument("--dir", type=Path, required=True, help="PKI directory")
    init.add_argument("--server-host", action="append", default=[], metavar="HOST",
                      help="extra DNS name or IP the coordinator's certificate is valid for (repeatable)")
    issue = pki_sub.add_parser("issue", help="issue a client certificate")
    issue.add_argument("--dir", type=Path, required=True, help="PKI directory made by `pki init`")
    issue.add_argument("--role", required=True, choices=ROLES, help="what the identity may do")
    issue.add_argument("--name", required=True, help="identity name (DNS label); a gateway's name is its gateway id")
    server = pki_sub.add_parser("server", help="reissue the coordinator's serving certificate (offline, needs ca.key)")
    server.add_argument("--dir", type=Path, required=True, help="PKI directory made by `pki init`")
    server.add_argument("--server-host", action="append", default=[], metavar="HOST",
                        help="extra DNS name or IP the coordinator's certificate is valid for (repeatable)")

    def coordinator_flags(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--coordinator", required=required, metavar="HOST:PORT",
                        help="a coordinator replica, called as an admin" + ("" if required else
                                                                            " (marks revoked certificates)"))
        sp.add_argument("--admin", default="admin", metavar="NAME",
                        help="admin identity in --dir to call with (default %(default)s)")
        sp.add_argument("--insecure", action="store_true", help="plaintext, for an --insecure loopback coordinator")

    listing = pki_sub.add_parser("list", help="list the certificates issued from a PKI directory")
    listing.add_argument("--dir", type=Path, required=True, help="PKI directory")
    coordinator_flags(listing, required=False)
    revoke = pki_sub.add_parser("revoke", help="revoke a certificate (by serial) or an identity (role and name)")
    revoke.add_argument("--dir", type=Path, default=Path("."), help="PKI directory holding the admin identity")
    coordinator_flags(revoke, required=True)
    revoke.add_argument("--serial", help="certificate serial in hex, as `pki list` prints it")
    revoke.add_argument("--role", choices=ROLES, help="revoke every certificate of this identity (with --name)")
    revoke.add_argument("--name", help="identity name (with --role)")
    revoke.add_argument("--reason", default="", help="free text kept with the revocation")

    from geomesh.apply import add_parser as add_apply_parser
    from geomesh.lab.cli import add_parser as add_lab_parser  # the lab has many flags of its own

    add_apply_parser(sub)

    add_lab_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "pki":
        return _pki(args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`geomesh`: the umbrella command line.

    geomesh pki init --dir D                      make a CA (idempotent)
    geomesh pki issue --dir D --role R --name N   issue a client certificate (admin|gateway|dns)
    geomesh apply PATH... --coordinator A         make the coordinator's state what TOML files declare
    geomesh lab [up|down|status]                  the multi-region lab (the main job)

The services have their own commands: geomesh-coordinator, geomesh-gateway, geomesh-dns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geomesh.errors import ValidationError
from geomesh.pki import ROLES, Pki


def _pki(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    if args.pki_cmd == "init":
        made = pki.init()
        print(f"{'created' if made else 'kept existing'} CA {pki.ca_cert_path}")
        server = pki.server(args.server_host)
        print(f"coordinator certificate {server.cert}")
        return 0
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

"""`geomesh lab`: bring the multi-region lab up, show it live, walk through it, tear it down.

    geomesh lab             up, walkthrough, then a live view until Ctrl-C; then everything is removed
    geomesh lab --check     up, walkthrough, down; exit 1 if any walkthrough step failed (CI)
    geomesh lab down        remove whatever a previous (possibly crashed) lab left behind
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from geomesh.errors import ValidationError
from geomesh.lab import netns
from geomesh.lab.control_plane import STATE_FILE, LabRecord, stop_pid
from geomesh.lab.plan import make_plan
from geomesh.regions_file import load_dir

DEFAULT_STATE = Path(tempfile.gettempdir()) / "geomesh-lab"


def add_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser(
        "lab", help="run the multi-region lab on this machine (the main job)",
        description="Bring up an embedded etcd, a coordinator, geodns and one gateway per region of --regions "
                    "(in network namespaces joined by a wireguard-go mesh when root; on loopback otherwise), "
                    "run a walkthrough that prints every command it runs, then show the system live. "
                    "Ctrl-C removes every process, namespace and interface the lab made.")
    lab.add_argument("action", nargs="?", default="up", choices=["up", "down"],
                     help="up (default); down: remove what a previous, possibly crashed, lab left behind")
    lab.add_argument("--regions", type=Path, default=Path("deploy/regions"),
                     help="directory of region TOMLs (default %(default)s)")
    lab.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                     help="where the lab keeps etcd data, PKI, configs, logs and its PID record (default %(default)s)")
    lab.add_argument("--loopback", action="store_true",
                     help="force loopback mode (no namespaces, mesh computed but not created) even as root")
    lab.add_argument("--check", action="store_true",
                     help="run the walkthrough, tear down, exit 1 if a step failed (for CI)")
    lab.add_argument("--no-walkthrough", action="store_true", help="skip the walkthrough")
    lab.add_argument("--timers", choices=["lab", "default"], default="lab",
                     help="lab: coordinator --lease-ttl 2 and gateway heartbeat_interval 0.5 for a quick walkthrough; "
                          "default: every flag at its shipped default (default %(default)s)")
    lab.add_argument("--refresh", type=float, default=2.0, help="live view refresh interval in seconds (default %(default)s)")
    lab.set_defaults(func=run)


def down(state_dir: Path, quiet: bool = False) -> int:
    record = LabRecord.load(state_dir / STATE_FILE)
    for name, pid in reversed(list(record.pids.items())):
        stop_pid(pid)
        if not quiet:
            print(f"stopped {name} (pid {pid})")
    from geomesh.lab.runner import NETNS_STATE_DIR

    if NETNS_STATE_DIR.exists():  # this lab's namespaces, and those of labs whose process died, never another live lab's
        removed = netns.sweep(NETNS_STATE_DIR, include_live_owners=True, prefixes=record.namespaces)
        for prefix in removed + netns.sweep(NETNS_STATE_DIR):
            if not quiet:
                print(f"removed namespaces and interfaces {prefix}-*")
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def _raise_interrupt(signum, frame):  # noqa: ANN001
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM both stop the lab cleanly, whatever started it: `geomesh lab &` from a
    non-interactive shell inherits SIGINT as ignored, so its handler is restored explicitly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def run(args: argparse.Namespace) -> int:
    from geomesh.lab.runner import Lab, netns_unavailable_reason

    install_signal_handlers()

    state_dir: Path = args.state_dir
    if args.action == "down":
        return down(state_dir)
    if (state_dir / STATE_FILE).exists():
        print(f"a previous lab left state in {state_dir}: cleaning it up first")
        down(state_dir, quiet=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    reason = "--loopback was given" if args.loopback else netns_unavailable_reason()
    if reason:
        print(f"LOOPBACK MODE: {reason}. Gateways run as plain processes on 127.0.1.x; WireGuard mesh links "
              "are computed and shown but not created; cross-region forwarding is not demonstrated.")
    try:
        regions = load_dir(args.regions)
        plan = make_plan(regions, netns=reason is None)
    except (ValidationError, ValueError) as exc:
        print(f"geomesh lab: {args.regions}: {exc}", file=sys.stderr)
        return 2
    lab = Lab(state_dir, regions, plan, timers=args.timers)
    interrupted = False
    ok = True
    try:
        lab.up()
        print(f"\nthe lab is up: coordinator {lab.cp.address}, geodns 127.0.0.1:{lab.dns_port}, "
              f"zone {lab.plan.zone}, state in {state_dir}")
        print(f"status page: {lab.status_url}")
        if not args.no_walkthrough:
            from geomesh.lab.walkthrough import Walkthrough

            print("\n== walkthrough (every command can be repeated by hand while the lab runs) ==")
            ok = Walkthrough(lab).run()
            print(f"\nwalkthrough: {'all steps hold' if ok else 'SOME STEPS FAILED'}")
        if args.check:
            return 0 if ok else 1
        _live(lab, args.refresh, lab.status_url)
        return 0
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        print("\ntearing down ..." if interrupted or not args.check else "tearing down ...", file=sys.stderr)
        lab.down()
        down(state_dir, quiet=True)


def _live(lab, refresh: float, status_url: str = "") -> None:
    from rich.console import Console
    from rich.live import Live

    from geomesh.lab.display import snapshot

    console = Console()
    console.print("\nlive view (Ctrl-C to stop and remove everything)"
                  + (f"; the same live in a browser: {status_url}" if status_url else "") + ":")
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            try:
                live.update(asyncio.run(snapshot(lab)))
            except Exception as exc:  # noqa: BLE001 - keep the view alive; show what failed
                live.update(f"[red]cannot read the coordinator: {exc}[/red]")
            time.sleep(refresh)

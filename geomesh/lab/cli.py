"""`geomesh lab`: bring the multi-region lab up, show it, tear it down.

Phase 1 (this file today): an embedded etcd, the PKI and a coordinator, the regions of
`deploy/regions/` created through the Admin API, and the grpcurl commands to talk to it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.lab.control_plane import STATE_FILE, ControlPlane, LabRecord, stop_pid
from geomesh.regions_file import load_dir

DEFAULT_STATE = Path(tempfile.gettempdir()) / "geomesh-lab"


def add_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="run the multi-region lab on this machine (the main job)",
                         description="Bring up an embedded etcd, a coordinator, the regions in --regions "
                                     "and print how to reach them; Ctrl-C tears everything down.")
    lab.add_argument("action", nargs="?", default="up", choices=["up", "down"],
                     help="up (default): start and stay in the foreground; down: remove whatever a "
                          "previous (possibly crashed) lab left behind")
    lab.add_argument("--regions", type=Path, default=Path("deploy/regions"), help="directory of region TOMLs (default %(default)s)")
    lab.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help="where the lab keeps etcd data, PKI, logs and its PID record (default %(default)s)")
    lab.add_argument("--once", action="store_true", help="start, print, then tear down at once (for smoke tests)")
    lab.set_defaults(func=run)


def down(state_dir: Path) -> int:
    record = LabRecord.load(state_dir / STATE_FILE)
    for name, pid in reversed(list(record.pids.items())):
        stop_pid(pid)
        print(f"stopped {name} (pid {pid})")
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


async def _apply_regions(cp: ControlPlane, regions_dir: Path) -> list[str]:
    files = load_dir(regions_dir)
    async with client_channel(cp.address, cp.pki.identity("admin", "lab-admin")) as ch:
        admin = pbg.AdminStub(ch)
        existing = {r.name for r in (await admin.ListRegions(pb.Empty(), timeout=5)).regions}
        for f in files:
            if f.region.name not in existing:
                await admin.CreateRegion(f.region.to_proto(), timeout=5)
    return [f.region.name for f in files]


def run(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    if args.action == "down":
        return down(state_dir)
    if (state_dir / STATE_FILE).exists():
        print(f"a previous lab left state in {state_dir}: cleaning it up first")
        down(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    record = LabRecord(state_dir / STATE_FILE)
    record.save()
    cp = ControlPlane(state_dir, record)
    try:
        print("[1/2] starting etcd and the coordinator ...", flush=True)
        cp.start()
        print("[2/2] creating regions ...", flush=True)
        names = asyncio.run(_apply_regions(cp, args.regions))
        print(f"\ngeomesh coordinator on {cp.address} (mTLS), etcd on {cp.etcd.endpoint}, regions: {', '.join(names)}")
        print("\nTalk to it with grpcurl:")
        g = cp.grpcurl_prefix()
        print(f"  {g} list")
        print(f"  {g} describe geomesh.v1.Admin")
        print(f"  {g} geomesh.v1.Admin/ListRegions")
        print(f"  {g} -d '{{\"name\":\"web\",\"lb_policy\":\"LB_POLICY_ROUND_ROBIN\"}}' geomesh.v1.Admin/CreateApp")
        if args.once:
            return 0
        print("\nCtrl-C to stop.", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM}) if hasattr(signal, "sigwait") else signal.pause()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("tearing down ...", file=sys.stderr)
        down(state_dir)

"""geomesh.lab.netns: topologies of namespaces, processes inside them, relays, and crash cleanup."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from geomesh.lab import netns
from tests.mesh.conftest import needs_netns, needs_wireguard_go

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.netns]


def host_netns_view() -> tuple[str, str, str]:
    run = lambda *a: subprocess.run(["ip", *a], capture_output=True, text=True, check=True).stdout  # noqa: E731
    return run("-o", "addr"), run("route", "show", "table", "all"), run("-o", "link")


@needs_netns
def test_hosts_on_two_networks_reach_each_other_and_host_namespace_is_untouched(topology: netns.Topology) -> None:
    before = host_netns_view()
    a = topology.add_host("a")
    b = topology.add_host("b")
    c = topology.add_host("c", network="203.0.113.0/24")
    assert (a.public_ip, b.public_ip, c.public_ip) == ("192.0.2.10", "192.0.2.11", "203.0.113.10")
    assert a.ping(b.public_ip) and a.ping(c.public_ip) and c.ping(b.public_ip)
    assert "192.0.2.10/24" in a.run(["ip", "-o", "addr", "show", "eth0"]).stdout
    assert host_netns_view() == before  # no address, route or link added to the host's namespace
    assert len(a.name) and a.name.startswith(topology.prefix + "-")


@needs_netns
def test_popen_pid_is_the_process_and_teardown_stops_it(topology: netns.Topology) -> None:
    host = topology.add_host("p")
    proc = host.popen(["sleep", "300"])
    # `ip netns exec` joins the namespace, then execs: for a moment the PID is not yet listed,
    # then listed while its command line reads "ip" or nothing (mid-exec). A wrapper that forked
    # instead would never read "sleep" under this PID.
    deadline = time.monotonic() + 5
    while host.pids() != [proc.pid] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.pids() == [proc.pid]
    while (argv0 := Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0]) != b"sleep" \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert argv0 == b"sleep"
    topology.remove_host("p")
    assert proc.wait(timeout=5) is not None
    assert netns.leftovers(topology.prefix)["namespaces"] == [topology.internet.name]


@needs_netns
def test_ifnames_are_short_and_unique(topology: netns.Topology) -> None:
    names = [topology.ifname() for _ in range(20)]
    assert len(set(names)) == 20 and all(len(n) <= 15 and n.startswith(topology.prefix) for n in names)
    with pytest.raises(netns.ValidationError):
        topology.ifname("muchtoolongtag")


@needs_netns
def test_forward_and_expose_tcp(topology: netns.Topology) -> None:
    host = topology.add_host("f")
    # a server on the host's loopback, reached from inside the namespace through forward_tcp
    server = socket.create_server(("127.0.0.1", 0))

    def echo_once(srv: socket.socket) -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=echo_once, args=(server,), daemon=True).start()
    fwd = host.forward_tcp(server.getsockname())
    out = host.run([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {fwd.port}), timeout=5)
        s.sendall(b"ping"); print(s.recv(100).decode())
    """)])
    assert out.stdout.strip() == "PING"
    # a server inside the namespace (on ITS loopback), reached from here through expose_tcp
    inner = host.call(socket.create_server, ("127.0.0.1", 0))
    threading.Thread(target=echo_once, args=(inner,), daemon=True).start()
    exposed = host.expose_tcp(inner.getsockname())
    with socket.create_connection(exposed.address, timeout=5) as s:
        s.sendall(b"pong")
        assert s.recv(100) == b"PONG"
    server.close()
    inner.close()


@needs_netns
def test_sweep_leaves_topologies_of_live_owners_alone(tmp_path: Path) -> None:
    with netns.Topology(state_dir=tmp_path) as topo:
        topo.add_host("x")
        assert netns.sweep(tmp_path) == []
        assert topo.hosts["x"].name in netns.list_namespaces()


CRASHER = """
import json, os, signal, subprocess, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from geomesh.lab.netns import Topology
from regional_gateway.wireguard.keys import PrivateKey
from regional_gateway.wireguard.userspace import UserspaceBackend

topo = Topology(state_dir=Path({state!r})).start()
a, b = topo.add_host("a"), topo.add_host("b")
sleeper = a.popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
info = {{"prefix": topo.prefix, "pids": [sleeper.pid], "sockets": []}}
if {with_wg!r}:
    ifname = topo.ifname()
    backend = UserspaceBackend(binary={wg!r}, netns=b.name)
    backend.ensure_interface(ifname, PrivateKey.generate(), 51820, "10.77.0.1/24")
    info["pids"].append(backend.pid)
    info["sockets"].append(ifname + ".sock")
print(json.dumps(info), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # crash: no teardown, no finally
"""


@needs_netns
@pytest.mark.parametrize("with_wg", [False, pytest.param(True, marks=needs_wireguard_go)])
def test_sweep_cleans_up_after_a_crash(tmp_path: Path, with_wg: bool) -> None:
    script = CRASHER.format(root=str(ROOT), state=str(tmp_path), with_wg=with_wg,
                            wg=str(__import__("shutil").which("wireguard-go")))
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        info = json.loads(proc.stdout)
        prefix = info["prefix"]
        state = tmp_path / f"{prefix}.json"
        # the crash left everything behind
        left = netns.leftovers(prefix)
        assert sorted(left["namespaces"]) == [f"{prefix}-a", f"{prefix}-b", f"{prefix}-inet"]
        assert left["sockets"] == info["sockets"]
        assert all(netns.proc_start_time(pid) is not None for pid in info["pids"])
        assert state.exists()
    finally:
        removed = netns.sweep(tmp_path)
    assert removed == [prefix]
    assert netns.leftovers(prefix) == {"namespaces": [], "sockets": [], "links": []}
    assert all(netns.proc_start_time(pid) is None for pid in info["pids"])
    assert not state.exists()
    assert not any(os.scandir(tmp_path))


@needs_netns
def test_explicit_addresses_and_bad_names_are_checked(topology: netns.Topology) -> None:
    a = topology.add_host("gw-us-east-1", address="192.0.2.11")
    b = topology.add_host("auto")  # auto allocation skips the taken .11
    assert (a.public_ip, b.public_ip) == ("192.0.2.11", "192.0.2.10")
    assert topology.add_host("next").public_ip == "192.0.2.12"
    with pytest.raises(netns.ValidationError, match="not a free host address"):
        topology.add_host("dup", address="192.0.2.11")
    with pytest.raises(netns.ValidationError, match="not a free host address"):
        topology.add_host("router", address="192.0.2.1")
    with pytest.raises(netns.ValidationError):
        topology.add_host("Bad_Name")
    with pytest.raises(netns.ValidationError, match="exists already"):
        topology.add_host("auto")

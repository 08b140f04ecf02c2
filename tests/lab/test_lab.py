"""The main job end to end: `geomesh lab --check` runs the whole walkthrough and leaves nothing behind.

The walkthrough includes the zone certificate obtained from the lab's pebble and trusted by curl
with pebble's root only, and a custom domain published by TXT record in the customer's gdnsd,
then fetched over HTTPS with its certificate obtained on demand (HTTP-01, pebble validating from
inside the lab's namespaces)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geomesh.lab import netns
from geomesh.lab.runner import netns_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
GEOMESH = [sys.executable, "-m", "geomesh.cli"]


def namespaces(prefix: str = "") -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {n for line in out.stdout.splitlines() if line.strip() and (n := line.split()[0]).startswith(prefix)}


def lab_prefix(output: str) -> str:
    for line in output.splitlines():
        if line.strip().startswith("namespaces gm"):
            return line.split()[1].rstrip("*")
    raise AssertionError(f"the lab did not say which namespaces it made:\n{output[-3000:]}")


def prefix_of(output: str) -> str:
    return lab_prefix(output).rstrip("-")


def wg_sockets() -> set[str]:
    d = Path("/var/run/wireguard")
    return {p.name for p in d.glob("*.sock")} if d.exists() else set()


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def lab(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GEOMESH, "lab", "--state-dir", str(state), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def assert_steps_ok(out: str, expected: list[str]) -> None:
    for title in expected:
        assert f"[ok ] {title}" in out, f"step {title!r} did not pass:\n{out[-4000:]}"
    assert "[FAIL]" not in out, out[-4000:]


TLS_STEP = "TLS: the zone certificate from the ACME CA"
CUSTOM_DOMAIN_STEP = "custom domain by TXT: www.shop.example.net over HTTPS reaches the app hello (certificate on demand)"


def assert_custom_domain_shown(text: str, state: Path, url: str) -> None:
    """The zone lines the customer publishes, the kdig of its TXT, and the domain answered by the
    app through a gateway over HTTPS, trusting only pebble's root (the certificate obtained on
    demand), with the time from the TXT record."""
    assert '_geomesh-app-address.www.shop.example.net. 30 TXT "app=hello"' in text
    assert "www.shop.example.net. 30 CNAME hello.lab.geomesh.test." in text
    assert "reload-zones" in text and "www.shop.example.net -> CNAME hello.lab.geomesh.test -> " in text
    assert "_geomesh-app-address.www.shop.example.net TXT +timeout=2" in text and 'TXT "app=hello";' in text
    step = text[text.index(CUSTOM_DOMAIN_STEP):]
    curl = next(line for line in step.splitlines() if "curl" in line)
    assert "--resolve www.shop.example.net:" in curl and curl.endswith(f"--cacert {state}/pebble-root.pem {url}")
    assert re.search(r"the first HTTPS answer \d+\.\d\d s after the TXT appeared \(target <= 5 s\), certificate "
                     r"obtained on demand from pebble, serial [0-9a-f]+: hello from hello instance", step), step[:2000]


def test_lab_in_namespaces_walkthrough_then_nothing_left(tmp_path):
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"netns lab needs root and wireguard-go: {reason}")
    socks_before = wg_sockets()
    state = tmp_path / "lab"
    out = lab(state, "--check")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert_steps_ok(text, ["DNS from three continents (EDNS Client Subnet) picks three regions",
                           TLS_STEP,
                           "a request through the eu-central gateway reaches a local instance",
                           "'solo' lives only in us-east: the ap-northeast gateway forwards over the mesh",
                           CUSTOM_DOMAIN_STEP,
                           "kill gw-eu-central-1: DNS stops returning it",
                           "restart gw-eu-central-1: it comes back",
                           "the mesh heals: gw-ap-northeast-1 reaches gw-eu-central-1 over WireGuard",
                           "cut gw-eu-central-1's public link: DNS moves the EU client off 192.0.2.21",
                           "restore gw-eu-central-1's public link: DNS sends the EU client back",
                           "grpcurl: the mesh/health overview"])
    # the link step prints the commands a person repeats, and how long each move took
    assert f"ip netns exec {prefix_of(text)}-gw-eu-central-1 ip link set eth0 down" in text
    assert "ip route replace default via 192.0.2.1 dev eth0" in text
    assert "the EU client is sent to" in text and "192.0.2.21 is answered again" in text
    assert "hello from solo instance" in text and "in us-east" in text
    # the HTTPS request a person repeats: from the client namespace, trusting pebble's root only
    assert (f"ip netns exec {prefix_of(text)}-client curl -sS --max-time 5 --resolve "
            f"hello.lab.geomesh.test:443:192.0.2.21 --cacert {state}/pebble-root.pem https://hello.lab.geomesh.test/") in text
    assert "obtained from pebble" in text and "served by all 3 gateways" in text
    assert_custom_domain_shown(text, state, "https://www.shop.example.net/")
    assert f"ip netns exec {prefix_of(text)}-client curl -sS --max-time 15 --resolve www.shop.example.net:443:" in text
    assert "pebble https://127.0.0.1:" in text and f"(in {prefix_of(text)}-dns, relayed to the host's 127.0.0.1" in text
    prefix = lab_prefix(text)
    assert not namespaces(prefix), "the lab left network namespaces behind"
    assert not {s for s in wg_sockets() - socks_before if s.startswith(prefix[:-1])}, "the lab left WireGuard interfaces behind"
    assert not processes_mentioning(str(state)), "the lab left processes behind"
    assert not state.exists()


def test_lab_loopback_mode_answers_dns(tmp_path):
    state = tmp_path / "lab"
    out = lab(state, "--check", "--loopback")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "LOOPBACK MODE: --loopback was given" in text
    assert "computed and shown but not created" in text
    assert_steps_ok(text, ["DNS from three continents (EDNS Client Subnet) picks three regions", TLS_STEP,
                           CUSTOM_DOMAIN_STEP, "kill gw-eu-central-1: DNS stops returning it"])
    assert f"--cacert {state}/pebble-root.pem https://hello.lab.geomesh.test:8443/" in text
    assert_custom_domain_shown(text, state, "https://www.shop.example.net:8443/")  # HTTP-01 at the shared 8080
    assert not processes_mentioning(str(state))


def test_lab_down_cleans_up_after_a_crashed_lab(tmp_path):
    state = tmp_path / "lab"
    proc = subprocess.Popen([*GEOMESH, "lab", "--state-dir", str(state), "--no-walkthrough", "--refresh", "30"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while "the lab is up" not in seen:
            assert time.monotonic() < deadline, seen[-3000:]
            line = proc.stdout.readline()
            assert line, f"lab exited early:\n{seen[-3000:]}"
            seen += line
        assert processes_mentioning(str(state)), "the lab should be running"
        prefix = lab_prefix(seen) if netns_unavailable_reason() is None else None
        proc.send_signal(signal.SIGKILL)  # a crash: no teardown runs
        proc.wait(10)
        assert processes_mentioning(str(state)), "children survive a crashed lab until `lab down`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = lab(state, "down", timeout=120)
    assert out.returncode == 0, out.stderr
    time.sleep(0.5)
    assert not processes_mentioning(str(state)), "lab down left processes"
    if prefix is not None:
        assert not namespaces(prefix), "lab down left namespaces"
    assert not state.exists()


def test_lab_down_leaves_another_running_lab_alone(tmp_path):
    """`geomesh lab down` removes its own lab's namespaces and those of labs whose process died,
    never the namespaces of another lab that is still running (two labs, or a test beside a lab)."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    from geomesh.lab.runner import NETNS_STATE_DIR

    other = netns.Topology(state_dir=NETNS_STATE_DIR)  # a live lab's topology: its owner is this process
    with other:
        other.add_host("gw", address="192.0.2.11")
        out = lab(tmp_path / "lab", "down", timeout=120)
        assert out.returncode == 0, out.stderr
        assert namespaces(other.prefix) == {f"{other.prefix}-inet", f"{other.prefix}-gw"}, out.stdout
        assert other.state_file.exists()
    assert not namespaces(other.prefix)

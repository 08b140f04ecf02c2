"""Benchmark: the outside-in probe traffic each gateway sends and receives (docs/reachability.md).

Two parts, both printed:

1. **Bytes per probe, measured.** In a private network namespace (`unshare -n`, so no other
   traffic shares the loopback counters), a real gateway data plane (`ProxyServer` with a plain
   and a TLS listener and an ECDSA P-256 certificate) is probed with the real prober
   (`reach_prober.probe_once`): TCP handshake, `GET /.well-known/geomesh/health`, the
   gateway's answer naming itself, close; and the same plus the TLS handshake on the TLS port.
   The loopback's transmit counters (`/proc/net/dev`) before and after each probe give the
   packets and IP bytes (a UDP datagram of known size calibrates what a frame's count includes:
   on Linux loopback, the IP packet alone). Without `unshare` (not root) the figure comes from a
   packet model instead, and says so.
2. **Probes per gateway, simulated.** For N gateways spread evenly over R regions the probe plan
   is built (`geomesh.probe_plan.plan`, m prober regions), and each gateway's targets (probes it
   sends per interval) and probers (probes it receives) are counted: mean and max, as probes/s
   and bytes/s at the probe interval, beside the design's figure m + R(R-1)/N per interval
   (the average; the coverage term is an upper bound) and full N x N probing (N - 1).

Run:  .venv/bin/python bench/probe_traffic.py                  (N = 100, 1000; R = 10, 20)
      .venv/bin/python bench/probe_traffic.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if Path(sys.path[0] or ".").resolve() == ROOT / "bench":  # run as a script: bench/http.py is not `http`
    sys.path[0] = str(ROOT)

from geomesh.probe_plan import DEFAULT_PROBER_REGIONS, plan  # noqa: E402

NAME = "gw-eu-central-1"
ZONE = "apps.example.com"


# -- part 1: one probe's bytes, measured in a private network namespace --------------------------


def _lo_tx() -> tuple[int, int]:
    """(bytes, packets) transmitted on this namespace's loopback."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            fields = rest.split()
            return int(fields[8]), int(fields[9])
    raise RuntimeError("no lo in /proc/net/dev")


def _link_overhead() -> int:
    """Octets /proc/net/dev counts per loopback frame beyond the IP packet (0 on Linux): one UDP
    datagram of 100 octets (an IP packet of 128) is sent and counted."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        b0, p0 = _lo_tx()
        tx.sendto(b"x" * 100, rx.getsockname())
        b1, p1 = _lo_tx()
    if p1 - p0 != 1:
        raise RuntimeError("the loopback counted other traffic during calibration")
    return b1 - b0 - 128


def _certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{ZONE}")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{ZONE}")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "zone.pem", directory / "zone.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def _measure(samples: int) -> dict:
    """Inside the namespace: probe a real data plane `samples` times per mode, count lo traffic."""
    from regional_gateway.proxy.routes import CertificateSpec, Routes
    from regional_gateway.proxy.server import ProxyServer
    from regional_gateway.proxy.settings import ProxySettings
    from regional_gateway.reach_prober import ProbeTarget, probe_once, probe_tls_context

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = _certificate(Path(tmp))
        settings = ProxySettings(http=("127.0.0.1:0",), https=("127.0.0.1:0",))
        server = ProxyServer(settings, Routes(zone=ZONE, self_name=NAME, region="eu-central",
                                              certificates=(CertificateSpec(cert, key),)))
        await server.start()
        http_port = server.addresses["http"][0][1]
        https_port = server.addresses["https"][0][1]
        tls = probe_tls_context()
        link = _link_overhead()
        out: dict = {"link_overhead": link}
        try:
            for mode, target in (("plain", ProbeTarget(NAME, "eu-central", "127.0.0.1", http_port)),
                                 ("tls", ProbeTarget(NAME, "eu-central", "127.0.0.1", http_port, https_port))):
                rows = []
                for i in range(samples + 3):
                    await asyncio.sleep(0.05)  # the previous exchange's last packets are out
                    b0, p0 = _lo_tx()
                    ok, seconds, why = await probe_once(target, 2.0, tls)
                    await asyncio.sleep(0.1)  # FIN/ACK of both sides
                    b1, p1 = _lo_tx()
                    if not ok:
                        raise RuntimeError(f"probe failed: {why}")
                    if i >= 3:  # the first ones warm up (TLS context, code paths)
                        rows.append((b1 - b0, p1 - p0))
                ip_bytes = [b - link * p for b, p in rows]
                out[mode] = {"packets": statistics.median(p for _, p in rows),
                             "ip_bytes": statistics.median(ip_bytes), "ip_bytes_max": max(ip_bytes),
                             "samples": len(rows)}
        finally:
            await server.shutdown(0.5)
    out["method"] = "measured (private netns loopback, /proc/net/dev)"
    return out


def _modelled() -> dict:
    """Without a private namespace: IPv4 + TCP with timestamps = 52 octets a segment (60 for SYNs).
    Handshake (SYN, SYN-ACK, ACK), request, response, their ACKs, FIN and ACK each way: 10
    packets, as measured; the TLS handshake added 16 packets and about 2.7 kB when measured."""
    from regional_gateway.reach_prober import HEALTH_PATH, health_response

    request = len(f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n"
                  f"User-Agent: geomesh-reach\r\n\r\n") + len(health_response(NAME)) + len("connection: close\r\n")
    plain_packets = 10
    plain = 60 + 60 + 52 * (plain_packets - 2) + request
    return {"plain": {"packets": plain_packets, "ip_bytes": plain, "ip_bytes_max": plain, "samples": 0},
            "tls": {"packets": plain_packets + 16, "ip_bytes": plain + 2700, "ip_bytes_max": plain + 2700,
                    "samples": 0},
            "method": "model (no private network namespace: run as root for a measurement)"}


def probe_bytes(samples: int) -> dict:
    try:
        proc = subprocess.run(["unshare", "-n", sys.executable, __file__, "--measure-child", str(samples)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"(no measurement: {exc})", file=sys.stderr)
        return _modelled()
    if proc.returncode != 0:
        print(f"(no measurement: {proc.stderr.strip()[-300:]})", file=sys.stderr)
        return _modelled()
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- part 2: probes per gateway in the plan --------------------------------------------------------


def simulate(n: int, regions: int, m: int) -> dict:
    """Probes per interval per gateway in the plan for `n` gateways over `regions` regions: sent
    (as prober), received (as target) and both, mean and max over the gateways."""
    regions_of = {f"gw-{i:04d}": f"r{i % regions:02d}" for i in range(n)}
    p = plan(regions_of, m)
    sent = [len(p.targets_of(g)) for g in regions_of]
    received = [len(p.probers_of(g)) for g in regions_of]
    both = [s + r for s, r in zip(sent, received, strict=True)]
    return {"n": n, "regions": regions, "m": m, "sent_mean": statistics.fmean(sent), "sent_max": max(sent),
            "received_mean": statistics.fmean(received), "received_max": max(received),
            "received_min": min(received), "both_mean": statistics.fmean(both), "both_max": max(both),
            "design": m + regions * (regions - 1) / n, "full_mesh": n - 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100,1000", help="gateway counts (default %(default)s)")
    ap.add_argument("--regions", default="10,20", help="region counts (default %(default)s)")
    ap.add_argument("--m", type=int, default=DEFAULT_PROBER_REGIONS, help="prober regions per gateway")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between probes of one target")
    ap.add_argument("--samples", type=int, default=20, help="probes measured per mode")
    ap.add_argument("--quick", action="store_true", help="N = 100 only, 5 samples (what tests/bench runs)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--measure-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_child is not None:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the new namespace's loopback
        print(json.dumps(asyncio.run(_measure(args.measure_child))))
        return 0
    if args.quick:
        args.n, args.samples = "100", 5
    size = probe_bytes(args.samples)
    plain, tls = size["plain"], size["tls"]
    print(f"one probe ({size['method']}):")
    print(f"  plain  {plain['packets']:>4.0f} packets  {plain['ip_bytes']:>6.0f} IP bytes (max {plain['ip_bytes_max']:.0f})"
          "   TCP handshake + GET /.well-known/geomesh/health + answer + close")
    print(f"  +TLS   {tls['packets']:>4.0f} packets  {tls['ip_bytes']:>6.0f} IP bytes (max {tls['ip_bytes_max']:.0f})"
          "   the same plus a TLS handshake on the TLS port (ECDSA P-256 leaf, no chain)")
    rows = []
    per_s = 1 / args.interval
    print(f"\nprobes per gateway, plan with m = {args.m}, one probe per target every {args.interval:g} s "
          "(per interval: sent as prober, received as target; design = m + R(R-1)/N each way, on average):")
    head = (f"{'N':>5} {'R':>3} | {'sent':>5} {'max':>3} | {'recv':>5} {'max':>3} | {'design':>6} {'N x N':>5} | "
            f"{'probes/s':>8} {'max':>5} | {'B/s plain':>9} {'max':>6} | {'B/s +TLS':>8} {'max':>6}")
    print(head)
    print("-" * len(head))
    for n in (int(x) for x in args.n.split(",")):
        for r in (int(x) for x in args.regions.split(",")):
            row = simulate(n, r, args.m)
            row.update(probes_per_s_mean=row["both_mean"] * per_s, probes_per_s_max=row["both_max"] * per_s,
                       bytes_per_s_plain_mean=row["both_mean"] * per_s * plain["ip_bytes"],
                       bytes_per_s_plain_max=row["both_max"] * per_s * plain["ip_bytes"],
                       bytes_per_s_tls_mean=row["both_mean"] * per_s * tls["ip_bytes"],
                       bytes_per_s_tls_max=row["both_max"] * per_s * tls["ip_bytes"])
            rows.append(row)
            print(f"{n:>5} {r:>3} | {row['sent_mean']:>5.2f} {row['sent_max']:>3} | {row['received_mean']:>5.2f} "
                  f"{row['received_max']:>3} | {row['design']:>6.2f} {row['full_mesh']:>5} | "
                  f"{row['probes_per_s_mean']:>8.1f} {row['probes_per_s_max']:>5.0f} | "
                  f"{row['bytes_per_s_plain_mean']:>9.0f} {row['bytes_per_s_plain_max']:>6.0f} | "
                  f"{row['bytes_per_s_tls_mean']:>8.0f} {row['bytes_per_s_tls_max']:>6.0f}")
    print("\nprobes/s and B/s: probes a gateway takes part in (sent + received), counting each probe's IP bytes "
          "in both directions; mean over gateways and the busiest gateway (max).")
    if args.json:
        args.json.write_text(json.dumps({"probe": size, "interval": args.interval, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

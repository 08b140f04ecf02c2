"""The workload and the answers of the GeoDNS benchmark (bench/dns.py), without I/O: the regions
both servers serve, the client /24s drawn from the GeoLite2 database (uniform over the address
space it knows, or with a quota per continent), the dnsperf wire files of queries with ECS and
0x20 names, the state file geomesh-dns loads and the gdnsd configuration for the same regions and
apps, and on the way back the parse of a reply (region chosen, ECS scope), the reason two servers
chose differently and the distribution of scopes.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import socket
import statistics
import struct
from pathlib import Path

import maxminddb

from geomesh.geo import great_circle_km

ZONE = "geo.example.com"
# name, latitude, longitude, gateway address (documentation range: answered, never contacted)
REGIONS = [
    ("eu-central", 50.11, 8.68, "192.0.2.13"),  # first: the default region (gdnsd's default order)
    ("us-east", 39.04, -77.49, "192.0.2.10"),
    ("us-west", 37.34, -121.89, "192.0.2.11"),
    ("sa-east", -23.55, -46.63, "192.0.2.12"),
    ("eu-west", 53.35, -6.26, "192.0.2.14"),
    ("af-south", -33.92, 18.42, "192.0.2.15"),
    ("ap-south", 19.08, 72.88, "192.0.2.16"),
    ("ap-southeast", 1.29, 103.85, "192.0.2.17"),
    ("ap-northeast", 35.68, 139.69, "192.0.2.18"),
    ("au-east", -33.87, 151.21, "192.0.2.19"),
]
REGION_OF_IP = {ip: name for name, _, _, ip in REGIONS}
CONTINENT_QUOTA = {"NA": 0.25, "EU": 0.25, "AS": 0.25, "SA": 0.09, "AF": 0.08, "OC": 0.08}
OURS, NOCACHE, GDNSD = "geomesh-dns", "geomesh-dns/no-cache", "gdnsd"
LOADS = ("hostile", "hot")
# special-purpose IPv4 blocks: never a client's ECS subnet
_SPECIAL = [(int(n.network_address), int(n.broadcast_address)) for n in map(ipaddress.IPv4Network, (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/3"))]



# -- data --------------------------------------------------------------------------------------


def special(net: int) -> bool:
    return any(lo <= net <= hi for lo, hi in _SPECIAL)


def draw_subnets(db: maxminddb.Reader, n: int, seed: int) -> list[tuple[bytes, str]]:
    """n distinct IPv4 /24s the database places, with a quota per continent (the hot load)."""
    rng = random.Random(seed)
    want = {c: max(1, round(n * share)) for c, share in CONTINENT_QUOTA.items()}
    want["NA"] += n - sum(want.values())
    got: dict[str, list[bytes]] = {c: [] for c in want}
    seen: set[bytes] = set()
    tries = 0
    while sum(len(v) for v in got.values()) < n:
        tries += 1
        if tries > 5_000_000:
            raise RuntimeError("could not draw enough subnets from the database")
        net = (rng.getrandbits(24) << 8).to_bytes(4, "big")
        if net in seen or not ipaddress.IPv4Address(net).is_global:
            continue
        rec = db.get(socket.inet_ntoa(net))
        if not isinstance(rec, dict):
            continue
        cont = rec.get("continent", {}).get("code")
        if cont not in got or len(got[cont]) >= want[cont]:
            continue
        seen.add(net)
        got[cont].append(net)
    out = [(net, c) for c, nets in got.items() for net in nets]
    rng.shuffle(out)
    return out


def draw_uniform(db: maxminddb.Reader, n: int, seed: int, exclude: set[bytes]) -> list[tuple[bytes, str]]:
    """n distinct IPv4 /24s drawn uniformly from the space the database has a record for (not in
    `exclude`), each with its continent code ("" when the record has none)."""
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[tuple[bytes, str]] = []
    budget = 4 * n + 100_000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"could not draw {n} distinct /24s from the database")
        value = rng.getrandbits(24) << 8
        net = value.to_bytes(4, "big")
        if net in seen or special(value):
            continue
        rec = db.get(socket.inet_ntoa(net))
        if not isinstance(rec, dict):
            continue
        seen.add(net)
        out.append((net, rec.get("continent", {}).get("code", "")))
    return out


def mixed_case(name: str, rng: random.Random) -> str:
    """0x20: each letter upper or lower case at random."""
    bits = rng.getrandbits(len(name))
    return "".join(c.upper() if bits >> i & 1 else c for i, c in enumerate(name))


def query_wire(qid: int, qname: str, net: bytes, prefix: int = 24) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 1)
    q = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    addr = net[:(prefix + 7) // 8]
    ecs = struct.pack("!HBB", 1, prefix, 0) + addr
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 4 + len(ecs)) + struct.pack("!HH", 8, len(ecs)) + ecs
    return header + q + opt


def write_query_file(path: Path, subnets: list[tuple[bytes, str]], apps: int, *, hostile: bool = False,
                     seed: int = 0) -> list[bytes]:
    """The dnsperf -B file of one query per subnet; hostile: random IDs and 0x20 names."""
    rng = random.Random(seed)
    wires = []
    with open(path, "wb") as f:
        for i, (net, _) in enumerate(subnets):
            name = f"app{i % apps}.{ZONE}"
            if hostile:
                w = query_wire(rng.getrandbits(16), mixed_case(name, rng), net)
            else:
                w = query_wire(i & 0xFFFF, name, net)
            wires.append(w)
            f.write(struct.pack("!H", len(w)) + w)
    return wires


def write_state(path: Path, apps: int) -> None:
    lines = ["[zone]", f'name = "{ZONE}"', 'nameservers = ["ns1=192.0.2.53"]', f'default_region = "{REGIONS[0][0]}"', ""]
    for name, lat, lon, ip in REGIONS:
        lines += ["[[regions]]", f'name = "{name}"', f"latitude = {lat}", f"longitude = {lon}",
                  f'gateways = [{{ name = "gw-{name}", ipv4 = "{ip}" }}]', ""]
    everywhere = ", ".join(f'"{r[0]}"' for r in REGIONS)
    for i in range(apps):
        lines += ["[[apps]]", f'name = "app{i}"', f"regions = [{everywhere}]", ""]
    path.write_text("\n".join(lines))


def moved_state(text: str) -> tuple[str, str]:
    """The state file text with its last region moved to Paris (what the rebuild-under-load run
    switches to), and that region's name."""
    name, lat, lon, _ = REGIONS[-1]
    old = f'name = "{name}"\nlatitude = {lat}\nlongitude = {lon}'
    if old not in text:
        raise ValueError(f"region {name} not found as written by write_state")
    return text.replace(old, f'name = "{name}"\nlatitude = 48.86\nlongitude = 2.35'), name


def write_gdnsd(d: Path, port: int, mmdb: Path, apps: int) -> None:
    (d / "zones").mkdir(parents=True)
    (d / "geoip").mkdir()
    os.symlink(mmdb, d / "geoip" / "GeoLite2-City.mmdb")
    dcs = " ".join(r[0] for r in REGIONS)
    coords = ", ".join(f"{name} => [ {lat}, {lon} ]" for name, lat, lon, _ in REGIONS)
    dcmap = ", ".join(f"{name} => {ip}" for name, _, _, ip in REGIONS)
    (d / "config").write_text(
        f"options => {{ listen => [ 127.0.0.1 ], dns_port => {port}, run_dir => {d}/run,\n"
        f"  state_dir => {d}/state, udp_threads => 1, tcp_threads => 1 }}\n"
        "plugins => { geoip => {\n"
        f"  maps => {{ gwmap => {{ geoip2_db => GeoLite2-City.mmdb, datacenters => [ {dcs} ],\n"
        f"    auto_dc_coords => {{ {coords} }} }} }}\n"
        f"  resources => {{ gw => {{ map => gwmap, service_types => up, dcmap => {{ {dcmap} }} }} }}\n"
        "} }\n")
    zone = ["$TTL 300", "@ SOA ns1 hostmaster 1 7200 1800 259200 30", "@ NS ns1", "ns1 A 192.0.2.53"]
    zone += [f"app{i} 30 DYNA geoip!gw" for i in range(apps)]
    (d / "zones" / ZONE).write_text("\n".join(zone) + "\n")


def _skip_name(msg: bytes, i: int) -> int:
    while True:
        n = msg[i]
        if n & 0xC0 == 0xC0:
            return i + 2
        if n == 0:
            return i + 1
        i += 1 + n


def parse_answer(reply: bytes) -> tuple[str | None, int]:
    """The region of the first A record of a reply and the ECS scope of its OPT (-1: none)."""
    qd, an, ns, ar = struct.unpack_from("!HHHH", reply, 4)
    i = 12
    for _ in range(qd):
        i = _skip_name(reply, i) + 4
    region: str | None = None
    scope = -1
    for k in range(an + ns + ar):
        i = _skip_name(reply, i)
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", reply, i)
        i += 10
        if k < an and region is None and rtype == 1 and rdlen == 4:
            region = REGION_OF_IP.get(socket.inet_ntoa(reply[i:i + 4]), "?")
        if k >= an + ns and rtype == 41:
            j = i
            while j + 4 <= i + rdlen:
                code, olen = struct.unpack_from("!HH", reply, j)
                if code == 8 and olen >= 4:
                    scope = reply[j + 7]
                j += 4 + olen
        i += rdlen
    return region, scope


def explain(db: maxminddb.Reader, net: bytes, ours: str | None, theirs: str | None) -> str:
    rec = db.get(socket.inet_ntoa(net))
    loc = rec.get("location") if isinstance(rec, dict) else None
    if not loc or "latitude" not in loc:
        return "no coordinates in the database"
    lat, lon = loc["latitude"], loc["longitude"]
    coords = {name: (la, lo) for name, la, lo, _ in REGIONS}
    if ours in coords and theirs in coords:
        d1 = great_circle_km(lat, lon, *coords[ours])
        d2 = great_circle_km(lat, lon, *coords[theirs])
        return f"location {lat},{lon}: {ours} {d1:.1f} km vs {theirs} {d2:.1f} km (near tie)" if abs(d1 - d2) < 50 \
            else f"location {lat},{lon}: {ours} {d1:.1f} km vs {theirs} {d2:.1f} km"
    return f"location {lat},{lon}"


def scope_summary(answers: list[tuple[str | None, int]]) -> dict[str, object]:
    """The distribution of ECS scopes: share per scope (descending share), the mean and the share
    of answers broader than /24 (a resolver may reuse them for other clients)."""
    scopes = [s for _, s in answers if s >= 0]
    counts: dict[int, int] = {}
    for s in scopes:
        counts[s] = counts.get(s, 0) + 1
    n = len(scopes)
    return {"answers": n, "counts": {str(k): v for k, v in sorted(counts.items())},
            "mean": statistics.fmean(scopes) if scopes else math.nan,
            "broader_than_24": sum(v for k, v in counts.items() if k < 24) / n if n else math.nan,
            "top": [(k, v / n) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:6]] if n else []}

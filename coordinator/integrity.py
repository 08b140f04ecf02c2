"""Referential integrity in etcd: the index keys that let one transaction check a rule, and a scan.

Every rule that relates two records is checked inside the etcd transaction that writes them
(probe finding 8), as a compare on a key: "the referenced object exists" is `create_revision > 0`
on its key; "nothing refers to this object" is `create_revision == 0` over a key *range* (etcd
compares every key of the range, and an empty range passes), so references are kept as index
keys under one prefix per referenced object:

    refs/regions/<r>/instances/<id>    "<app>/<id>": an instance of region r (and: its id is taken in r)
    refs/regions/<r>/gateways/<g>      gateway g is in region r
    refs/regions/<r>/apps/<a>          app a pins region r
    refs/apps/<a>/domains/<fqdn>       custom domain fqdn points at app a
    instance-names/<id>/<r>            "<app>": some instance is called <id> (against app names)
    wgkeys/<key, base64url>            gateway owning that WireGuard public key
    subnets/v<4|6>/<prefix bits>       region owning that instance subnet (e.g. v4/000010100101101000000001)
    ipam/<ip>                          gateway owning that mesh address (older than this module)

An app's instances need no index: they live under `instances/<app>/`. Each index key is written
and deleted in the same transaction as the record it indexes, and created-if-absent where it is a
uniqueness claim. Subnets must be disjoint, not only different: a subnet's claim key is its
network's prefix bits, so "no claimed subnet inside mine" is one range compare under my key and
"no claimed subnet containing mine" is one absent compare per shorter prefix (at most 31 for
IPv4, 127 for IPv6); exact, no retries, no false conflicts between unrelated regions.

Pure: key names, the index keys a record implies, and `dangling` (what a scan of etcd finds
broken), used by the tests and by hand (`etcdctl get --prefix /geomesh/v1/`).
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.state import PREFIX, key

ZERO_WG_KEY = base64.b64encode(bytes(32)).decode()


def region_ref(region: str, kind: str, name: str) -> bytes:
    return key("refs", f"regions/{region}/{kind}/{name}")


def region_refs(region: str) -> bytes:
    """The prefix under which every reference to `region` lives."""
    return key("refs", f"regions/{region}/")


def app_domain_ref(app: str, fqdn: str) -> bytes:
    return key("refs", f"apps/{app}/domains/{fqdn}")


def app_refs(app: str) -> bytes:
    return key("refs", f"apps/{app}/")


def app_instances(app: str) -> bytes:
    return key("instances", f"{app}/")


def instance_name(instance_id: str, region: str) -> bytes:
    return key("instance-names", f"{instance_id}/{region}")


def instance_names(instance_id: str) -> bytes:
    """The prefix of every instance called `instance_id` (in any region)."""
    return key("instance-names", f"{instance_id}/")


def wg_key_claim(public_key: str) -> bytes:
    return key("wgkeys", base64.urlsafe_b64encode(base64.b64decode(public_key)).decode())


def _bits(subnet: str) -> tuple[int, str]:
    net = ipaddress.ip_network(subnet)
    width = net.max_prefixlen
    return net.version, format(int(net.network_address), f"0{width}b")[:net.prefixlen]


def subnet_claim(subnet: str) -> bytes:
    """`subnets/v4/<the network's prefix bits>`: a subnet inside another has the other's key as
    a prefix of its own, so overlap is a question about key prefixes (`subnet_overlap_keys`)."""
    version, bits = _bits(subnet)
    return key("subnets", f"v{version}/{bits}")


def subnet_overlap_keys(subnet: str) -> tuple[bytes, list[bytes]]:
    """What must be absent for `subnet` to overlap no claimed subnet: every key under its own
    claim (itself and every subnet inside it: one range compare) and the claims of each larger
    network containing it (one compare per shorter prefix length)."""
    version, bits = _bits(subnet)
    return subnet_claim(subnet), [key("subnets", f"v{version}/{bits[:n]}") for n in range(1, len(bits))]


def index_keys(directory: str, name: str, value: bytes) -> dict[bytes, bytes]:
    """The index keys (key -> value) that the record `<directory>/<name>` = value implies."""
    data = json.loads(value)
    if directory == "instances":
        return {region_ref(data["region"], "instances", data["id"]): name.encode(),
                instance_name(data["id"], data["region"]): data["app"].encode()}
    if directory == "gateways":
        out = {region_ref(data["region"], "gateways", name): name.encode(),
               wg_key_claim(data["wg_public_key"]): name.encode()}
        if data.get("mesh_ip"):
            out[key("ipam", data["mesh_ip"])] = name.encode()
        return out
    if directory == "apps":
        return {region_ref(r, "apps", name): name.encode() for r in data.get("pinned_regions", ())}
    if directory == "domains":
        return {app_domain_ref(data["app"], name): name.encode()}
    if directory == "regions":
        return {subnet_claim(data["instance_subnet"]): name.encode()} if data.get("instance_subnet") else {}
    return {}


INDEXED = ("instances", "gateways", "apps", "domains", "regions")
INDEX_DIRS = ("refs", "instance-names", "wgkeys", "subnets", "ipam")


@dataclass(frozen=True, slots=True)
class Problem:
    key: str
    rule: str


def dangling(kvs: Iterable[tuple[bytes, bytes]]) -> list[Problem]:
    """Every broken rule in a scan of etcd (key, value pairs under PREFIX): a record referring to
    a missing region or app, an index key with no record behind it, a record without its index
    keys, two records claiming one index key. Empty: the store is consistent."""
    records: dict[str, dict[str, bytes]] = {d: {} for d in INDEXED}
    indexes: dict[bytes, bytes] = {}
    for k, v in kvs:
        rest = k[len(PREFIX):].decode()
        directory, _, name = rest.partition("/")
        if directory in records:
            records[directory][name] = v
        elif directory in INDEX_DIRS:
            indexes[k] = v
    problems: list[Problem] = []
    expected: dict[bytes, str] = {}
    for directory, items in records.items():
        for name, value in items.items():
            data = json.loads(value)
            where = f"{directory}/{name}"
            if directory in ("instances", "gateways") and data["region"] not in records["regions"]:
                problems.append(Problem(where, f"region {data['region']!r} does not exist"))
            if directory in ("instances", "domains") and data["app"] not in records["apps"]:
                problems.append(Problem(where, f"app {data['app']!r} does not exist"))
            if directory == "apps":
                for r in data.get("pinned_regions", ()):
                    if r not in records["regions"]:
                        problems.append(Problem(where, f"pinned region {r!r} does not exist"))
            if directory == "instances" and data["id"] in records["apps"]:
                problems.append(Problem(where, f"instance id {data['id']!r} is an app name"))
            for ik, iv in index_keys(directory, name, value).items():
                if ik in expected:
                    problems.append(Problem(where, f"claims {ik.decode()} that {expected[ik]} claims too"))
                    continue
                expected[ik] = where
                if indexes.get(ik) != iv:
                    problems.append(Problem(where, f"index {ik.decode()} is missing or wrong"))
    subnets = sorted(((ipaddress.ip_network(json.loads(v)["instance_subnet"]), n)
                      for n, v in records["regions"].items() if json.loads(v).get("instance_subnet")),
                     key=lambda t: (t[0].version, t[0]))
    for i, (net, name) in enumerate(subnets):
        for other, other_name in subnets[i + 1:]:
            if net.version == other.version and net.overlaps(other):  # type: ignore[arg-type]
                problems.append(Problem(f"regions/{name}", f"subnet {net} overlaps region {other_name}'s {other}"))
    for ik in indexes:
        if ik not in expected:
            problems.append(Problem(ik.decode(), "index key without its record"))
    return problems

"""Zone lookup: which name a query asks for, and which records answer it.

Two pure steps, CoreDNS-style. `classify(view, labels)` says what a name under the zone is
(the apex, a name server, an app in one of the platform's forms `<app>`, `<app>-<port>`,
`<app>-<port>s`, `<app>-<port>g`, an instance in the same forms `<instance-id>[-<port>[s|g]]`,
a region's `gw.<region>`, an empty non-terminal, or nothing). The name forms are read as the
gateways read them (`regional_gateway.proxy.hostnames`): a whole label naming an app, then one
naming an instance, wins over the `-<port>` reading; then the base of the `-<port>` form is
looked up the same way. `records(view, target, qtype, region)` returns a `Lookup`: the rcode,
the records of each section and the region chosen; only `geodns.answer` turns that into a
message. For apps the caller passes the region that `geodns.nearest` chose for the client. An
instance name answers with the gateways of the region that hosts the instance, wherever the
client is (`instance_region`). ANY gets one RRset
(RFC 8482); negative answers carry the SOA (RFC 2308). A TXT record of the routing table (an
ACME DNS-01 challenge) answers TXT (and ANY) at its owner name, one RR per value with the
record's TTL, when the name is nothing else (the apex aside, whose TXT also answers); the
names between it and the zone are empty non-terminals. A region's addresses are those of its
reachable gateways; when every gateway of the asked family is unreachable the routable ones
answer anyway and the `Lookup` says so (`fail_open`, counted as `geomesh_dns_fail_open_total`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dnslib import AAAA, NS, SOA, TXT, A

from geodns.view import SOA_EXPIRE, SOA_REFRESH, SOA_RETRY, AppView, NameServer, RegionView, View
from geodns.wire import (
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_NS,
    TYPE_SOA,
    TYPE_TXT,
)

# Owner of a record: the question's name (case as asked), the zone apex (case as asked), or a
# name written out (name servers outside the zone).
OWNER_QNAME = "@q"
OWNER_APEX = "@"

_APP_FORM = re.compile(rb"^([a-z0-9][a-z0-9-]*?)-([0-9]{1,5})([sg]?)$")


# -- what a name is ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Apex:
    pass


@dataclass(frozen=True, slots=True)
class NameServerHost:
    ns: NameServer


@dataclass(frozen=True, slots=True)
class AppName:
    app: AppView
    port: int = 0
    mode: str = ""  # "", "s" (TLS passthrough) or "g" (gRPC)


@dataclass(frozen=True, slots=True)
class InstanceName:
    """`<instance-id>[-<port>[s|g]]`: one instance, served through its own region's gateways."""

    instance: str
    regions: tuple[str, ...]  # the regions with an instance of this id (ids may repeat across apps)
    port: int = 0
    mode: str = ""


@dataclass(frozen=True, slots=True)
class RegionGateways:
    region: RegionView


@dataclass(frozen=True, slots=True)
class TxtName:
    """The owner of a TXT record (`View.txt`)."""

    values: tuple[str, ...]
    ttl: int


@dataclass(frozen=True, slots=True)
class EmptyNonTerminal:
    pass


@dataclass(frozen=True, slots=True)
class NoSuchName:
    pass


Target = (Apex | NameServerHost | AppName | InstanceName | RegionGateways | TxtName | EmptyNonTerminal
          | NoSuchName)


def zone_labels(view: View) -> tuple[bytes, ...]:
    return tuple(label.encode() for label in view.zone.name.split("."))


def split(view: View, labels: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """The labels in front of the zone (lowercase input), or None when outside the zone."""
    zl = zone_labels(view)
    n = len(zl)
    if len(labels) < n or labels[len(labels) - n:] != zl:
        return None
    return labels[:len(labels) - n]


def classify(view: View, rel: tuple[bytes, ...]) -> Target:
    """What the name `rel` + zone (lowercase labels) is."""
    if not rel:
        return Apex()
    zone = view.zone.name
    try:
        text = ".".join(label.decode("ascii") for label in rel)
    except UnicodeDecodeError:
        return NoSuchName()
    fqdn = f"{text}.{zone}"
    for ns in view.zone.nameservers:
        if ns.name == fqdn:
            return NameServerHost(ns)
    if len(rel) == 1:
        found = _named(view, text, 0, "")
        if found is not None:
            return found
        m = _APP_FORM.match(rel[0])
        if m is not None:
            port = int(m.group(2))
            if 1 <= port <= 65535:
                found = _named(view, m.group(1).decode(), port, m.group(3).decode())
                if found is not None:
                    return found
    if len(rel) == 2 and rel[0] == b"gw":
        region = view.regions.get(rel[1].decode())
        if region is not None:
            return RegionGateways(region)
    txt = view.txt.get(fqdn)
    if txt is not None:
        return TxtName(*txt)
    if fqdn in view.txt_parents:
        return EmptyNonTerminal()  # between a TXT owner and the zone
    if len(rel) == 1 and text in view.regions:
        return EmptyNonTerminal()  # parent of gw.<region>
    for ns in view.zone.nameservers:
        if ns.name.endswith("." + fqdn):
            return EmptyNonTerminal()  # parent of a name server's name
    return NoSuchName()


def _named(view: View, label: str, port: int, mode: str) -> AppName | InstanceName | None:
    """An app called `label`, else an instance with that id (the gateways' order), else None."""
    app = view.apps.get(label)
    if app is not None:
        return AppName(app, port, mode)
    regions = view.instances.get(label)
    if regions:
        return InstanceName(label, regions, port, mode)
    return None


def instance_region(view: View, target: InstanceName) -> RegionView | None:
    """The region whose gateways answer for an instance: of the regions with an instance of that
    id (one, unless ids repeat across apps), the first by name with a healthy gateway, else the
    first with a routable one (fail-open), else None (no gateway can take the name: NODATA)."""
    regions = [r for r in (view.regions.get(name) for name in target.regions) if r is not None]
    for ok in (lambda r: r.healthy, lambda r: r.routable):
        for r in regions:
            if ok(r):
                return r
    return None


# -- the records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    owner: str  # OWNER_QNAME, OWNER_APEX or an fqdn
    rtype: int
    ttl: int
    rdata: object  # a dnslib RD


@dataclass(frozen=True, slots=True)
class Lookup:
    rcode: int
    answer: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = ()
    region: str = ""  # the region whose gateways answer ("" when none was involved)
    fail_open: bool = False  # answered with gateways found unreachable: no reachable one was left


def soa(view: View) -> Record:
    z = view.zone
    rdata = SOA(z.soa_mname + ".", z.soa_rname + ".",
                (view.serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, z.negative_ttl))
    return Record(OWNER_APEX, TYPE_SOA, z.negative_ttl, rdata)


def _address_records(owner: str, ttl: int, ipv4: tuple[str, ...], ipv6: tuple[str, ...],
                     qtype: int) -> tuple[Record, ...]:
    if qtype == TYPE_ANY:  # RFC 8482: one RRset is enough
        qtype = TYPE_A if ipv4 else TYPE_AAAA
    if qtype == TYPE_A:
        return tuple(Record(owner, TYPE_A, ttl, A(ip)) for ip in ipv4)
    if qtype == TYPE_AAAA:
        return tuple(Record(owner, TYPE_AAAA, ttl, AAAA(ip)) for ip in ipv6)
    return ()


def _region_records(ttl: int, region: RegionView, qtype: int) -> tuple[tuple[Record, ...], bool]:
    """A region's gateway records for `qtype` and whether they fail open (`RegionView.addresses`)."""
    v4, open4 = region.addresses(4)
    v6, open6 = region.addresses(6)
    if qtype == TYPE_ANY:
        qtype = TYPE_A if v4 else TYPE_AAAA
    rrs = _address_records(OWNER_QNAME, ttl, v4, v6, qtype)
    return rrs, bool(rrs) and (open4 if qtype == TYPE_A else open6)


def _txt_records(values: tuple[str, ...], ttl: int) -> tuple[Record, ...]:
    """One TXT RR per value, each value one character-string (at most 255 octets: the model's rule)."""
    return tuple(Record(OWNER_QNAME, TYPE_TXT, ttl, TXT(value.encode("ascii"))) for value in values)


def _glue(view: View) -> tuple[Record, ...]:
    out = []
    zone_suffix = "." + view.zone.name
    for ns in view.zone.nameservers:
        if ns.name.endswith(zone_suffix):
            for ip in ns.addresses:
                rtype, rd = (TYPE_AAAA, AAAA(ip)) if ":" in ip else (TYPE_A, A(ip))
                out.append(Record(ns.name, rtype, view.zone.ns_ttl, rd))
    return tuple(out)


def records(view: View, target: Target, qtype: int, region: RegionView | None = None) -> Lookup:
    """The answer for `target`; for an AppName, `region` is the one chosen for the client."""
    z = view.zone
    nodata = Lookup(RCODE_NOERROR, authority=(soa(view),))
    if isinstance(target, Apex):
        if qtype in (TYPE_SOA, TYPE_ANY):
            return Lookup(RCODE_NOERROR, (soa(view),))
        if qtype == TYPE_NS:
            ns = tuple(Record(OWNER_APEX, TYPE_NS, z.ns_ttl, NS(n.name + ".")) for n in z.nameservers)
            return Lookup(RCODE_NOERROR, ns, additional=_glue(view))
        apex_txt = view.txt.get(z.name)
        if qtype == TYPE_TXT and apex_txt is not None:
            return Lookup(RCODE_NOERROR, _txt_records(*apex_txt))
        return nodata
    if isinstance(target, TxtName):
        if qtype in (TYPE_TXT, TYPE_ANY):
            return Lookup(RCODE_NOERROR, _txt_records(target.values, target.ttl))
        return nodata
    if isinstance(target, NameServerHost):
        v4 = tuple(a for a in target.ns.addresses if ":" not in a)
        v6 = tuple(a for a in target.ns.addresses if ":" in a)
        rrs = _address_records(OWNER_QNAME, z.ns_ttl, v4, v6, qtype)
        return Lookup(RCODE_NOERROR, rrs) if rrs else nodata
    if isinstance(target, RegionGateways):
        r = target.region
        rrs, fail_open = _region_records(z.ttl, r, qtype)
        if rrs:
            return Lookup(RCODE_NOERROR, rrs, region=r.name, fail_open=fail_open)
        return Lookup(RCODE_NOERROR, authority=(soa(view),), region=r.name)
    if isinstance(target, AppName):
        if not view.ready:
            return Lookup(RCODE_SERVFAIL)
        if region is None:
            return nodata  # no healthy gateway anywhere the app may be served from
        rrs, fail_open = _region_records(z.ttl, region, qtype)
        if rrs:
            return Lookup(RCODE_NOERROR, rrs, region=region.name, fail_open=fail_open)
        return Lookup(RCODE_NOERROR, authority=(soa(view),), region=region.name)
    if isinstance(target, InstanceName):
        if not view.ready:
            return Lookup(RCODE_SERVFAIL)
        where = instance_region(view, target)
        if where is None:
            return nodata
        rrs, fail_open = _region_records(z.ttl, where, qtype)
        if rrs:
            return Lookup(RCODE_NOERROR, rrs, region=where.name, fail_open=fail_open)
        return Lookup(RCODE_NOERROR, authority=(soa(view),), region=where.name)
    if isinstance(target, EmptyNonTerminal):
        return nodata
    if not view.ready:
        return Lookup(RCODE_SERVFAIL)  # we cannot tell yet whether the app exists
    return Lookup(RCODE_NXDOMAIN, authority=(soa(view),))

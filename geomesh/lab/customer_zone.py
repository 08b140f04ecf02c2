"""The lab's customer: their own zone on an authoritative gdnsd, the recursive resolver the
gateways ask, and the records that point a domain of theirs at an app.

`records_for(domain, app, zone)` and `zone_text(zone, records)` are pure: the owner's
`_geomesh-app-address.<domain> TXT "app=<app>"` and `<domain> CNAME <app>.<zone>` lines, and the
zone file around them (SOA, NS). `CustomerDns.start` runs the pair where the gateways reach it:
in netns mode inside a host namespace of its own on the lab's internet (gdnsd on that
namespace's loopback, unbound on its public address, port 53); on loopback both on 127.0.0.1.
unbound knows only two stub zones: the customer's (gdnsd) and the lab's zone (geomesh-dns on the
host's 127.0.0.1; from the namespace through a TCP relay, asked over TCP), so a CNAME into the
lab's zone resolves to the gateways GeoDNS picks; it is also the lab's pebble's `-dnsserver`.
The coordinator checks custom domains' TXT records itself (`--resolver`), from the host's
namespace, which must never send to the lab's documentation ranges: in netns mode it gets a
second unbound of its own on the host's 127.0.0.1 (`coordinator_resolver`) whose only stub zone,
the customer's, is asked over TCP through a relay into the namespace (`expose_tcp` to gdnsd); on
loopback it shares the one unbound. `publish` rewrites the zone file and has gdnsd reload it;
`publish_argv` is the same as commands a person can run.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from geomesh.lab.customer_dns import Gdnsd, Unbound
from geomesh.lab.netns import PUBLIC_NETWORKS, Host

RECORD_TTL = 30  # seconds, the customer's records
SOA = "$TTL {ttl}\n@ SOA ns1 hostmaster {serial} 7200 1800 259200 5\n@ NS ns1\nns1 A 127.0.0.1\n"


def records_for(domain: str, app: str, zone: str, ttl: int = RECORD_TTL) -> tuple[str, ...]:
    """The two records an app's owner publishes for `domain` (docs/custom-domains.md)."""
    return (f'_geomesh-app-address.{domain}. {ttl} TXT "app={app}"',
            f"{domain}. {ttl} CNAME {app}.{zone}.")


def zone_text(records: tuple[str, ...] = (), serial: int = 1, ttl: int = RECORD_TTL) -> str:
    """A zone file for gdnsd: SOA (negative answers cached 5 s), NS, then `records`."""
    return SOA.format(ttl=ttl, serial=serial) + "".join(r + "\n" for r in records)


@dataclass
class CustomerDns:
    zone: str
    gdnsd: Gdnsd
    unbound: Unbound
    host_unbound: Unbound | None = None  # the coordinator's, on the host's 127.0.0.1 (netns mode)
    serial: int = 1

    @property
    def resolver(self) -> str:
        """The recursive resolver as the gateways' `[custom_domains] resolver` names it."""
        host, port = self.unbound.address
        return f"{host}:{port}"

    @property
    def coordinator_resolver(self) -> str:
        """The resolver the coordinator's `--resolver` names, reachable from the host's namespace."""
        host, port = (self.host_unbound or self.unbound).address
        return f"{host}:{port}"

    @property
    def pids(self) -> dict[str, int]:
        named = {"gdnsd": self.gdnsd, "unbound": self.unbound, "unbound-host": self.host_unbound}
        return {k: d.proc.pid for k, d in named.items() if d is not None and d.proc is not None}

    @classmethod
    def start(cls, directory: Path, zone: str, lab_zone: str, geodns_port: int,
              host: Host | None = None) -> CustomerDns:
        """gdnsd for `zone` (no records yet) and unbound reaching it and geomesh-dns (see above)."""
        if host is None:
            gdnsd = Gdnsd(directory / "gdnsd", {zone: zone_text()})
            stubs = {zone: gdnsd.address, lab_zone: ("127.0.0.1", geodns_port)}
            try:
                return cls(zone, gdnsd, Unbound(directory / "unbound", stubs))
            except Exception:
                gdnsd.stop()
                raise
        gdnsd = Gdnsd(directory / "gdnsd", {zone: zone_text()}, netns=host)
        unbound = None
        try:
            relay = host.forward_tcp(("127.0.0.1", geodns_port))  # closed by the topology's teardown
            unbound = Unbound(directory / "unbound", {zone: gdnsd.address, lab_zone: ("127.0.0.1", relay.port)},
                              tcp_stubs=(lab_zone,), allow=("127.0.0.0/8", *PUBLIC_NETWORKS),
                              listen=host.public_ip, port=53, netns=host)
            inward = host.expose_tcp(gdnsd.address)  # the host's 127.0.0.1:<any> -> gdnsd in the namespace
            host_unbound = Unbound(directory / "unbound-host", {zone: ("127.0.0.1", inward.port)}, tcp_stubs=(zone,))
        except Exception:
            if unbound is not None:
                unbound.stop()
            gdnsd.stop()
            raise
        return cls(zone, gdnsd, unbound, host_unbound)

    def publish(self, records: tuple[str, ...]) -> None:
        """The zone with these records (and a new serial), live once this returns."""
        self.serial += 1
        self.gdnsd.set_zone(self.zone, zone_text(records, self.serial))

    def publish_argv(self, records: tuple[str, ...]) -> list[list[str]]:
        """`publish` as commands: append the records to the zone file, reload gdnsd."""
        append = "printf '%s\\n' " + " ".join(shlex.quote(r) for r in records) \
            + f" >> {shlex.quote(str(self.gdnsd.zone_path(self.zone)))}"
        return [["sh", "-c", append], self.gdnsd.reload_argv()]

    def kdig_argv(self, name: str, qtype: str = "A") -> list[str]:
        host, port = self.unbound.address
        return ["kdig", f"@{host}", "-p", str(port), name, qtype, "+timeout=2", "+retry=1"]

    def stop(self) -> None:
        if self.host_unbound is not None:
            self.host_unbound.stop()
        self.unbound.stop()
        self.gdnsd.stop()

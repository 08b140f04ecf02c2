"""The lab's customer: their own zone on an authoritative gdnsd, the recursive resolver the
gateways ask, and the records that point a domain of theirs at an app.

`records_for(domain, app, zone)` and `zone_text(zone, records)` are pure: the owner's
`_geomesh-app-address.<domain> TXT "app=<app>"` and `<domain> CNAME <app>.<zone>` lines, and the
zone file around them (SOA, NS). `CustomerDns.start` runs the pair where the gateways reach it:
in netns mode inside a host namespace of its own on the lab's internet (gdnsd on that
namespace's loopback, unbound on its public address, port 53); on loopback both on 127.0.0.1.
unbound knows only two stub zones: the customer's (gdnsd) and the lab's zone (geomesh-dns on the
host's 127.0.0.1; from the namespace through a TCP relay, asked over TCP), so a CNAME into the
lab's zone resolves to the gateways GeoDNS picks. `publish` rewrites the zone file and has gdnsd
reload it; `publish_argv` is the same as commands a person can run.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from geomesh.lab.customer_dns import Gdnsd, Unbound
from geomesh.netns import PUBLIC_NETWORKS, Host

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
    serial: int = 1

    @property
    def resolver(self) -> str:
        """The recursive resolver as the gateways' `[custom_domains] resolver` names it."""
        host, port = self.unbound.address
        return f"{host}:{port}"

    @property
    def pids(self) -> dict[str, int]:
        return {d.name: d.proc.pid for d in (self.gdnsd, self.unbound) if d.proc is not None}

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
        try:
            relay = host.forward_tcp(("127.0.0.1", geodns_port))  # closed by the topology's teardown
            unbound = Unbound(directory / "unbound", {zone: gdnsd.address, lab_zone: ("127.0.0.1", relay.port)},
                              tcp_stubs=(lab_zone,), allow=("127.0.0.0/8", *PUBLIC_NETWORKS),
                              listen=host.public_ip, port=53, netns=host)
        except Exception:
            gdnsd.stop()
            raise
        return cls(zone, gdnsd, unbound)

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
        self.unbound.stop()
        self.gdnsd.stop()

"""What the lab's geodns answered, as `kdig` shows it: the status and the A records.

The lab, its end-to-end tests and `bench/failover.py` ask geodns with `kdig` (the command a
person repeats by hand) and must tell a NODATA answer (NOERROR, no records: what fail-open
forbids) from no answer at all (a timeout) and from an error rcode. `parse` reads kdig's full
output (pure, table-tested); `query` runs one bounded kdig.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

TIMEOUT = "TIMEOUT"  # status when kdig got no answer
_STATUS = re.compile(r"status: ([A-Z]+)")


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    status: str                    # NOERROR, NXDOMAIN, SERVFAIL, ... or TIMEOUT
    addresses: tuple[str, ...] = ()

    @property
    def nodata(self) -> bool:
        """NOERROR with no A record: the answer fail-open must never give for an app with gateways."""
        return self.status == "NOERROR" and not self.addresses

    @property
    def answered(self) -> bool:
        return self.status == "NOERROR" and bool(self.addresses)


def kdig_argv(port: int, name: str, subnet: str | None, *, short: bool = False, timeout: int = 2) -> list[str]:
    """The kdig command asking the lab's geodns (127.0.0.1:`port`) for `name` A, as a resolver
    serving `subnet` would (EDNS Client Subnet)."""
    argv = ["kdig", "@127.0.0.1", "-p", str(port), name, "A", f"+timeout={timeout}", f"+retry={1 if short else 0}"]
    if short:
        argv.insert(6, "+short")
    if subnet:
        argv.append(f"+subnet={subnet}")
    return argv


def parse(output: str) -> DnsAnswer:
    """kdig's full output -> DnsAnswer (TIMEOUT when it shows no header)."""
    m = _STATUS.search(output)
    if m is None:
        return DnsAnswer(TIMEOUT)
    addresses = []
    for line in output.splitlines():
        if line.startswith(";"):
            continue
        parts = line.split()
        if len(parts) >= 5 and parts[2] == "IN" and parts[3] == "A":
            addresses.append(parts[4])
    return DnsAnswer(m.group(1), tuple(addresses))


def query(port: int, name: str, subnet: str | None, timeout: int = 2) -> DnsAnswer:
    """One kdig query, bounded by `timeout` seconds (plus process start)."""
    try:
        out = subprocess.run(kdig_argv(port, name, subnet, timeout=timeout), capture_output=True, text=True,
                             timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return DnsAnswer(TIMEOUT)
    return parse(out.stdout)

"""What a custom domain's TXT record names, as the coordinator looks it up: never the gateway's word.

The coordinator checks the record itself before it marks a pinned domain verified
(`coordinator.pinned_domains`) or orders a certificate on demand (`coordinator.cert_requests`): a
gateway's request only says "someone asked for this name". The records are those of
`geomesh.app_address` (`_geomesh-app-address.<host>` TXT `app=<name>[:<port>]`, or the seed's
`_dstack-app-address.<host>` `app-id=<name>`), looked up through the coordinator's `--resolver`
with `geomesh.txt_resolver` (random IDs, bounded tries, TCP when truncated).

`read_answers` (pure) applies the gateway's rules: owners in order of precedence, the first naming
an app wins; a failed look-up of an earlier owner before any mapping is a failure (the seed's
record must not stand in for geomesh's when that one could not be read). `DomainTxt.check(host)`
asks both names at once; concurrent checks of one host share one look-up. Every check is counted
in `geomesh_coordinator_domain_txt_checks_total{purpose,result}` (`result`: `app`, `none`,
`error`), every refused value in `geomesh_coordinator_domain_txt_rejected_total{reason}`
(`app_address.Garbage`: floods of records, long or binary values, other forms, conflicts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import Counter

from geomesh import validate
from geomesh.app_address import OWNERS, AppAddress, Garbage, read_records
from geomesh.errors import ValidationError
from geomesh.txt_resolver import Answer, ResolverError, TxtRecords, TxtResolver, ask_owners

CHECKS = Counter("geomesh_coordinator_domain_txt_checks", "Custom-domain TXT look-ups by the coordinator, by "
                 "purpose (pinned, certificate, renewal) and result (app, none, error)", ["purpose", "result"])
REJECTED = Counter("geomesh_coordinator_domain_txt_rejected", "Custom-domain TXT values the coordinator refused, "
                   "by reason", ["reason"])
for _g in Garbage:
    REJECTED.labels(_g.value)



@dataclass(frozen=True, slots=True)
class TxtVerdict:
    """The app a host's record names (None: no valid record), or why it could not be read."""

    host: str
    address: AppAddress | None
    failure: str = ""  # the look-up failed (timeout, SERVFAIL): nothing is known
    garbage: tuple[Garbage, ...] = ()

    @property
    def result(self) -> str:
        return "error" if self.failure else "none" if self.address is None else "app"

    @property
    def record(self) -> str:
        owner = self.address.owner if self.address is not None else OWNERS[0]
        return f"{owner}.{self.host}"

    def names(self, app: str) -> bool:
        return self.address is not None and self.address.app == app

    def explain(self) -> str:
        """A sentence for a log line or a refusal."""
        if self.failure:
            return f"the TXT record of {self.host} could not be looked up: {self.failure}"
        if self.address is None:
            junk = f" (values refused: {', '.join(sorted({g.value for g in self.garbage}))})" if self.garbage else ""
            return f"no valid TXT record {OWNERS[0]}.{self.host} (nor {OWNERS[1]}.{self.host}){junk}"
        return f"TXT record {self.record} names app {self.address.app!r}"


def read_answers(host: str, answers: Mapping[str, Answer]) -> TxtVerdict:
    """The answers at the record names (by owner) -> the verdict (pure; the gateway's precedence)."""
    garbage: list[Garbage] = []
    for owner in OWNERS:
        answer = answers.get(owner)
        if answer is None:
            continue
        if isinstance(answer, ResolverError):
            return TxtVerdict(host, None, answer.message or answer.reason, tuple(garbage))
        if isinstance(answer, TxtRecords):
            found = read_records(owner, answer.values)
            garbage.extend(found.garbage)
            if found.address is not None:
                return TxtVerdict(host, found.address, garbage=tuple(garbage))
    return TxtVerdict(host, None, garbage=tuple(garbage))


def resolver_address(value: str) -> tuple[str, int]:
    """`--resolver` as (ip, port); ValidationError naming `resolver` otherwise."""
    try:
        text = validate.query_address("resolver", value)
    except ValidationError as exc:
        raise ValidationError("resolver", exc.message) from None
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class DomainTxt:
    """Looks custom domains' TXT records up through one recursive resolver (see the module)."""

    def __init__(self, resolver: TxtResolver) -> None:
        self.resolver = resolver
        self.inflight: dict[str, asyncio.Future[TxtVerdict]] = {}

    @classmethod
    def at(cls, address: str, timeout: float = 1.0) -> DomainTxt:
        return cls(TxtResolver(resolver_address(address), timeout=timeout))

    async def check(self, host: str, purpose: str) -> TxtVerdict:
        """The verdict on `host`'s records (a look-up in flight for it is joined)."""
        host = host.lower().rstrip(".")
        pending = self.inflight.get(host)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up(host))
            self.inflight[host] = pending
            pending.add_done_callback(lambda _f: self.inflight.pop(host, None))
        verdict = await asyncio.shield(pending)
        CHECKS.labels(purpose, verdict.result).inc()
        return verdict

    async def _look_up(self, host: str) -> TxtVerdict:
        answers = await ask_owners(self.resolver, host)
        if not answers:
            return TxtVerdict(host, None, garbage=())
        verdict = read_answers(host, answers)
        for reason in verdict.garbage:
            REJECTED.labels(reason.value).inc()
        return verdict

"""Certificates on demand: a TLS handshake for a custom domain waits while its certificate is obtained.

Caddy's on-demand TLS, gated by the TXT record. The TLS listener only peeks at the ClientHello, so
a connection can wait before its handshake while nothing else does. When the SNI is a custom
domain (its TXT record names an app here, `CustomDomains.verify`; or a verified pinned domain) and
no certificate in service covers it (`CertificateStore.covers`: the exact name or its wildcard),
the listener awaits `OnDemandCertificates.obtain(name)`:

1. the coordinator is asked through the agent's channel (`ask`, the GatewayControl
   `RequestCertificate` call). It checks the TXT record itself and orders by ACME HTTP-01, which
   every gateway answers on its plain listener;
2. the certificate then arrives over the session like any other (sealed to this gateway,
   `certificate_intake`) and the store changes: `obtain` waits on the store's change signal, never
   polls, and returns once the store covers the name;
3. all of it within `wait` seconds (`custom_domains.on_demand_wait`, 10 by default).

Concurrent handshakes for one name share one request. A refusal (the coordinator's reason: no
matching TXT record, rate limited, ...) is remembered for `refusal_ttl` seconds, so a client
retrying does not reach the coordinator each time. `obtain` returns "" when the certificate is in
service, else the reason, which the listener logs and answers with a TLS `unrecognized_name`
alert: never a hang. Later handshakes find the certificate in the store and never get here.

Counted in `geomesh_gateway_on_demand_certificates_total{result}`: `obtained` (in service within
the wait), `refused` (the coordinator said no), `refused_cached`, `timeout` (accepted, not in
service within the wait), `error` (the coordinator could not be asked), per handshake that waited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter

from geomesh.logs import event
from regional_gateway.proxy.certificates import CertificateStore

log = logging.getLogger("geomesh.gateway.on_demand")
RESULTS = ("obtained", "refused", "refused_cached", "timeout", "error")
OBTAINS = Counter("geomesh_gateway_on_demand_certificates", "TLS handshakes that waited for a certificate on "
                  "demand, by result", ["result"])
for _r in RESULTS:
    OBTAINS.labels(_r)
MAX_REFUSALS = 10_000  # names whose refusal is remembered; the oldest is forgotten first


@dataclass(frozen=True, slots=True)
class Answer:
    """The coordinator's answer to a certificate request."""

    accepted: bool
    reason: str  # accepted: "held", "pending", "ordered"; refused: why (the status and its details)
    error: bool = False  # the coordinator could not be asked (unreachable, timed out)


Ask = Callable[[str], Awaitable[Answer]]


class OnDemandCertificates:
    def __init__(self, certs: CertificateStore, ask: Ask, *, wait: float = 10.0, refusal_ttl: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.certs = certs
        self.ask = ask
        self.wait = wait
        self.refusal_ttl = refusal_ttl
        self.clock = clock
        self.inflight: dict[str, asyncio.Future[tuple[str, str]]] = {}
        self.refused: OrderedDict[str, tuple[float, str]] = OrderedDict()  # name -> (until, reason)

    async def obtain(self, name: str) -> str:
        """"" once a certificate in service covers `name` (within `wait`), else why not."""
        if self.certs.covers(name):
            return ""
        held = self.refused.get(name)
        if held is not None:
            if held[0] > self.clock():
                OBTAINS.labels("refused_cached").inc()
                return held[1]
            del self.refused[name]
        pending = self.inflight.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._obtain(name))
            self.inflight[name] = pending
            pending.add_done_callback(lambda _f: self.inflight.pop(name, None))
        result, reason = await asyncio.shield(pending)
        OBTAINS.labels(result).inc()
        return reason

    async def _obtain(self, name: str) -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.wait
        start = loop.time()
        try:
            answer = await asyncio.wait_for(self.ask(name), self.wait)
        except TimeoutError:
            answer = Answer(False, f"the coordinator did not answer within {self.wait:g} s", error=True)
        except Exception as exc:  # noqa: BLE001 - any failure to ask is a refusal with its reason, never a hang
            answer = Answer(False, f"the coordinator could not be asked: {exc}", error=True)
        if not answer.accepted:
            reason = f"no certificate for {name}: {answer.reason}"
            self._remember(name, reason)
            event(log, "certificate on demand refused", logging.WARNING, name=name, reason=answer.reason)
            return ("error" if answer.error else "refused"), reason
        while not self.certs.covers(name):
            left = end - loop.time()
            if left <= 0:
                reason = (f"no certificate for {name} within {self.wait:g} s (the coordinator answered "
                          f"{answer.reason!r}; later handshakes will find it once it arrives)")
                event(log, "certificate on demand not in time", logging.WARNING, name=name, wait=self.wait,
                      answer=answer.reason)
                return "timeout", reason
            try:
                await asyncio.wait_for(asyncio.shield(self.certs.changed()), left)
            except TimeoutError:
                continue
        event(log, "certificate on demand in service", name=name, answer=answer.reason,
              waited=round(loop.time() - start, 2))
        return "obtained", ""

    def _remember(self, name: str, reason: str) -> None:
        self.refused[name] = (self.clock() + self.refusal_ttl, reason)
        self.refused.move_to_end(name)
        while len(self.refused) > MAX_REFUSALS:
            self.refused.popitem(last=False)

    def close(self) -> None:
        """Cancel what is in flight (server shutdown): each waiting handshake gets its alert."""
        for pending in list(self.inflight.values()):
            pending.cancel()

"""A gateway asks for a custom domain's certificate (on-demand TLS): the coordinator decides.

`GatewayControl/RequestCertificate(name)` comes from a gateway in the middle of a TLS handshake
for a name it holds no certificate for, whose TXT record the gateway found naming an app. The
coordinator never takes the gateway's word: `CertificateRequests.request` checks, in this order,

1. the name: a lowercase domain name, not in the zone (the zone's certificate covers that), else
   INVALID_ARGUMENT / FAILED_PRECONDITION naming `name`;
2. ACME and `--resolver` configured, else FAILED_PRECONDITION saying which is missing;
3. a certificate held for the name (not expired): accepted at once (`held`); a request recorded
   already: accepted (`pending`). Neither costs any budget;
4. the budget: requests that reach the TXT check are rate-limited per gateway
   (`--cert-request-rate`, burst twice that, at least 5) and for all gateways (`--cert-request-global-rate`),
   per replica: RESOURCE_EXHAUSTED naming which; at most `--cert-request-max-pending` requests
   wait at once, and at most `MAX_CERTIFICATES` (500) are held and requested in all, what a
   gateway takes in one certificate set (RESOURCE_EXHAUSTED);
5. the TXT record, looked up by the coordinator itself (`coordinator.domain_txt`): missing,
   garbage, failing to resolve, or naming an app that does not exist is FAILED_PRECONDITION,
   "no order without a matching TXT record: ...";

and then records `certrequests/<name>` (`cert_records.CertRequest`: the app, the gateway, when),
created only if absent, and answers accepted (`ordered`). The ordering leader takes it from there
(`coordinator.on_demand_orders`). Every answer is counted in
`geomesh_certificate_requests_total{result}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from coordinator.cert_records import REQUESTS_DIR, CertRequest
from coordinator.domain_txt import DomainTxt
from coordinator.heartbeats import TokenBucket
from coordinator.state import State, key
from coordinator.store import EtcdStore, Txn
from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ExhaustedError, PreconditionError, ValidationError

RESULTS = ("held", "pending", "ordered", "bad_name", "in_zone", "not_configured", "rate_limited",
           "too_many_pending", "no_txt", "txt_failed", "no_app")
ANSWERS = Counter("geomesh_certificate_requests", "Gateways' requests for a custom domain's certificate, by "
                  "answer", ["result"])
for _r in RESULTS:
    ANSWERS.labels(_r)
MAX_GATEWAY_BUCKETS = 10_000
MAX_CERTIFICATES = 500  # certificates held and requested at most: a gateway takes 512 in one set (certificate_intake)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    gateway_rate: float = 1.0    # TXT-checked requests per second and gateway (burst: twice that, at least 5)
    global_rate: float = 10.0    # for all gateways together (burst: twice that)
    max_pending: int = 100       # requests recorded and not yet done

    def __post_init__(self) -> None:
        if not 0.01 <= self.gateway_rate <= 1000:
            raise ValidationError("cert_request_rate", f"{self.gateway_rate:g} is not 0.01..1000 per second")
        if not 0.01 <= self.global_rate <= 10000:
            raise ValidationError("cert_request_global_rate", f"{self.global_rate:g} is not 0.01..10000 per second")
        if not 1 <= self.max_pending <= 100_000:
            raise ValidationError("cert_request_max_pending", f"{self.max_pending} is not 1..100000")


def _bucket(rate: float) -> TokenBucket:
    return TokenBucket(rate, max(5.0, 2 * rate))


def _answer(result: str, accepted: bool = True) -> pb.CertificateRequestResponse:
    ANSWERS.labels(result).inc()
    return pb.CertificateRequestResponse(accepted=accepted, reason=result)


def _refuse(result: str, error: Exception) -> Exception:
    ANSWERS.labels(result).inc()
    return error


class CertificateRequests:
    """The RequestCertificate decision (see the module); one per replica."""

    def __init__(self, store: EtcdStore, state: State, *, zone: str | None, txt: DomainTxt | None,
                 limits: RequestLimits = RequestLimits(), clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.state = state
        self.zone = zone  # the ACME zone (None: no ACME, nothing is ordered)
        self.txt = txt    # the resolver (None: no --resolver)
        self.limits = limits
        self.clock = clock
        self.wall = wall
        self.shared = _bucket(limits.global_rate)
        self.buckets: dict[str, TokenBucket] = {}

    async def request(self, gateway: str, raw_name: str) -> pb.CertificateRequestResponse:
        try:
            name = validate.fqdn("name", raw_name)
        except ValidationError as exc:
            raise _refuse("bad_name", exc) from None
        if self.zone is not None and (name == self.zone or name.endswith("." + self.zone)):
            raise _refuse("in_zone", PreconditionError(
                f"name: {name} is in the zone {self.zone}: its certificate is the zone's, not ordered on demand"))
        if self.zone is None or self.txt is None:
            missing = "--acme-directory" if self.zone is None else "--resolver"
            raise _refuse("not_configured", PreconditionError(
                f"no certificates on demand: the coordinator runs without {missing}"))
        snap = self.state.snapshot()
        held = snap.certs.get(name)
        if held is not None and name in held.dns_names and held.not_after > self.wall():
            return _answer("held")
        if name in snap.cert_requests:
            return _answer("pending")
        self._spend(gateway)
        if len(snap.certs) + len(snap.cert_requests) >= MAX_CERTIFICATES:
            raise _refuse("too_many_pending", ExhaustedError(
                f"{len(snap.certs)} certificates are held and {len(snap.cert_requests)} requested (the most is "
                f"{MAX_CERTIFICATES}, what a gateway takes in one set): {name} was not recorded"))
        if len(snap.cert_requests) >= self.limits.max_pending:
            raise _refuse("too_many_pending", ExhaustedError(
                f"{len(snap.cert_requests)} certificate requests are pending (the most is "
                f"{self.limits.max_pending}): {name} was not recorded, ask again later"))
        verdict = await self.txt.check(name, "certificate")
        if verdict.failure:
            raise _refuse("txt_failed", PreconditionError(f"no order without a matching TXT record: {verdict.explain()}"))
        if verdict.address is None:
            raise _refuse("no_txt", PreconditionError(f"no order without a matching TXT record: {verdict.explain()}"))
        app = verdict.address.app
        if app not in self.state.snapshot().apps:
            raise _refuse("no_app", PreconditionError(
                f"no order without a matching TXT record: {verdict.explain()}, which does not exist"))
        record = CertRequest(name, app, gateway, self.wall())
        k = key(REQUESTS_DIR, name)
        result = await self.store.txn(Txn().absent(k).put(k, record.to_json()))
        if result.succeeded:
            await self.state.wait_change(result.revision - 1, timeout=2.0)  # the leader's mirror gets it as fast
        return _answer("ordered" if result.succeeded else "pending")

    def _spend(self, gateway: str) -> None:
        now = self.clock()
        bucket = self.buckets.get(gateway)
        if bucket is None:
            if len(self.buckets) >= MAX_GATEWAY_BUCKETS:
                self.buckets.clear()  # a flood of names cannot grow memory; the shared bucket still bounds
            bucket = self.buckets[gateway] = _bucket(self.limits.gateway_rate)
        if not bucket.take(now):
            raise _refuse("rate_limited", ExhaustedError(
                f"gateway {gateway} asks for certificates faster than {self.limits.gateway_rate:g} per second"))
        if not self.shared.take(now):
            raise _refuse("rate_limited", ExhaustedError(
                f"gateways ask for certificates faster than {self.limits.global_rate:g} per second in all"))

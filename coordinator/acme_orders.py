"""The replica that obtains the zone's certificate: ACME DNS-01 answered by geomesh-dns itself.

Every coordinator replica runs `ZoneCertificates.run()`; one at a time orders. The leader holds
`acme/leader`, put only when absent and bound to its replica lease: when it dies or loses etcd
for longer than the lease TTL the key goes and another replica takes over on its next check.

A round of the leader (`round_once`): the ACME account (`acme/account`, its key sealed at rest),
then, if `coordinator.renewal.due_at` says so, an order for `<zone>` and `*.<zone>`: a fresh key,
the challenge values written as `txt/_acme-challenge.<zone>` (they reach every GeoDNS server over
the routing feed), a wait until every live GeoDNS server (`dns/<server>`, announced on the feed)
answers them, then the CA validates, the chain is stored in `certs/<zone>` with the key sealed
under the replicas' secrets key, and the challenge is withdrawn. Each attempt's outcome is
`certstatus/<zone>`: failures in a row, the last error and the next attempt (exponential
backoff). The certificate held keeps serving while renewals fail. Gateways get the certificate
over their sessions, its key sealed to each (`coordinator.cert_records.bundles_for`).

`order_http01(names)` is the other way in, for names outside the zone (custom domains): ACME
HTTP-01 answered by every gateway's plain HTTP listener (`coordinator.http01`), stored and
recorded the same way under the first name; any replica may call it, leader or not.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from coordinator.acme_client import AcmeClient, AcmeError, Issued, check_names, new_key_pem
from coordinator.cert_records import (
    ACME_DIR,
    CERTS_DIR,
    STATUS_DIR,
    AccountRecord,
    CertificateRecord,
    RenewalStatus,
    key_context,
)
from coordinator.dns_check import wait_all_serve
from coordinator.http01 import Http01Challenges
from coordinator.leadership import Leadership
from coordinator.renewal import RenewalPolicy, after_failure, after_success, due_at
from coordinator.state import State, key
from coordinator.store import EtcdStore, ReplicaLease, Txn
from geomesh import validate
from geomesh.errors import StoreUnavailableError, ValidationError
from geomesh.logs import event
from geomesh.model import TxtRecord
from geomesh.sealing import SealError, SecretBox

log = logging.getLogger("geomesh.coordinator.acme")

LEADER = Gauge("geomesh_acme_leader", "1 while this coordinator replica is the one that orders certificates")
NOT_AFTER = Gauge("geomesh_certificate_not_after_seconds",
                  "expiry (unix seconds) of each certificate the coordinators obtained", ["name"])
FAILING = Gauge("geomesh_certificate_renewal_failures",
                "failed attempts in a row to obtain or renew each certificate (0 = the last one worked)", ["name"])
ORDERS = Counter("geomesh_certificate_orders_total", "ACME orders by outcome", ["name", "result"])


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    directory: str                      # the CA's ACME directory URL
    zone: str                           # certified as <zone> and *.<zone>
    email: str = ""
    ca_bundle: Path | None = None       # CA certificates to trust for the directory's HTTPS
    policy: RenewalPolicy = RenewalPolicy()
    challenge_ttl: int = 5              # TTL of the challenge TXT
    propagation_deadline: float = 30.0  # how long to wait for every GeoDNS server to serve it
    order_deadline: float = 90.0
    check_interval: float = 5.0         # how often a replica checks leadership and the schedule
    http01_grace: float = 1.0           # HTTP-01: the wait for gateways whose session is on another replica

    def __post_init__(self) -> None:
        if not self.directory.startswith(("https://", "http://")):
            raise ValidationError("acme_directory", f"{self.directory!r} is not an http(s) URL")
        object.__setattr__(self, "zone", validate.fqdn("acme_zone", self.zone))
        if not 0.2 <= self.check_interval <= 3600:
            raise ValidationError("acme_check_interval", "must be 0.2..3600 seconds")
        if not 0 <= self.http01_grace <= 60:
            raise ValidationError("acme_http01_grace", "must be 0..60 seconds")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.zone, f"*.{self.zone}")

    @property
    def challenge_name(self) -> str:
        return f"_acme-challenge.{self.zone}"


class ZoneCertificates:
    def __init__(self, settings: AcmeSettings, store: EtcdStore, state: State, lease: ReplicaLease,
                 box: SecretBox, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.state = state
        self.lease = lease
        self.box = box
        self.clock = clock
        self.leadership = Leadership(store, lease, f"{ACME_DIR}/leader")
        self.leading = False
        self._client: AcmeClient | None = None
        self.http01: Http01Challenges | None = None  # set by the server: HTTP-01 through every gateway

    async def run(self) -> None:
        while True:
            try:
                self.leading = await self.elect()
                LEADER.set(1 if self.leading else 0)
                if self.leading:
                    await self.round_once()
            except StoreUnavailableError as exc:
                event(log, "certificate round skipped: etcd unavailable", logging.WARNING, error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not end the loop that renews certificates
                log.exception("certificate round failed", extra={"fields": {"error": str(exc)}})
            self._publish_metrics()
            await asyncio.sleep(self._sleep_for())

    def _sleep_for(self) -> float:
        if not self.leading:
            return self.settings.check_interval
        name = self.settings.zone
        snap = self.state.snapshot()
        when = due_at(snap.certs.get(name), snap.cert_status.get(name), self.settings.names, self.settings.policy)
        return max(0.2, min(self.settings.check_interval, when - self.clock()))

    def _publish_metrics(self) -> None:
        snap = self.state.snapshot()
        for name, rec in snap.certs.items():
            NOT_AFTER.labels(name).set(rec.not_after)
        for name, status in snap.cert_status.items():
            FAILING.labels(name).set(status.failures)

    async def elect(self) -> bool:
        """Hold `acme/leader` (under this replica's lease) or see who does."""
        return await self.leadership.hold()

    async def round_once(self) -> bool:
        """One look at the schedule; orders when due. True when a certificate was obtained."""
        name, snap = self.settings.zone, self.state.snapshot()
        record, status = snap.certs.get(name), snap.cert_status.get(name)
        now = self.clock()
        if due_at(record, status, self.settings.names, self.settings.policy) > now:
            return False
        try:
            issued, key_pem = await self._order()
        except (AcmeError, SealError, StoreUnavailableError, OSError) as exc:
            await self._failed(name, status, exc)
            return False
        await self._store(name, issued, key_pem)
        return True

    async def order_http01(self, names: Sequence[str]) -> CertificateRecord:
        """A certificate for `names` (no wildcard) by ACME HTTP-01, answered by every gateway
        (`coordinator.http01`), stored as `certs/<first name>` with its key sealed and its
        `certstatus/` set, exactly as the zone's; the sessions then send it to every gateway.
        Raises AcmeError (after recording the failure in `certstatus/`) when the order fails."""
        if self.http01 is None:
            raise AcmeError("http-01 orders need the gateways' challenge sets (coordinator.http01)")
        name = check_names(names)[0]  # AcmeError naming the field for a bad name
        status = self.state.snapshot().cert_status.get(name)
        try:
            client = await self._account()
            key_pem = new_key_pem()
            issued = await client.order_http01(names, key_pem, self.http01.publish, self.http01.withdraw,
                                               deadline=self.settings.order_deadline)
        except (AcmeError, SealError, StoreUnavailableError, OSError) as exc:
            await self._failed(name, status, exc)
            if isinstance(exc, AcmeError):
                raise
            raise AcmeError(f"ACME order for {name}: {exc}") from exc
        return await self._store(name, issued, key_pem)

    async def _failed(self, name: str, status: RenewalStatus | None, exc: Exception) -> None:
        failed = after_failure(name, status, self.clock(), str(exc), self.settings.policy)
        ORDERS.labels(name, "failed").inc()
        event(log, "certificate order failed, the certificate held keeps serving", logging.ERROR,
              name=name, failures=failed.failures, retry_in=round(failed.renew_at - self.clock(), 1),
              error=str(exc)[:300])
        await self.store.put(key(STATUS_DIR, name), failed.to_json())
        FAILING.labels(name).set(failed.failures)  # now, not when the mirror catches up

    async def _store(self, name: str, issued: Issued, key_pem: bytes) -> CertificateRecord:
        """The chain in `certs/<name>` with its key sealed, and the schedule in `certstatus/<name>`."""
        new = CertificateRecord(name, issued.names, issued.chain_pem, issued.not_after, issued.serial,
                                base64.b64encode(self.box.seal(key_pem, key_context(name, issued.serial))).decode())
        del key_pem
        ok = after_success(name, new, self.settings.policy)
        await self.store.txn(Txn().put(key(CERTS_DIR, name), new.to_json()).put(key(STATUS_DIR, name), ok.to_json()))
        ORDERS.labels(name, "issued").inc()
        NOT_AFTER.labels(name).set(new.not_after)
        FAILING.labels(name).set(0)
        event(log, "certificate obtained", name=name, serial=new.serial, not_after=int(new.not_after),
              renew_at=int(ok.renew_at), names=",".join(new.dns_names))
        return new

    async def _account(self) -> AcmeClient:
        if self._client is not None:
            return self._client
        directory = self.settings.directory
        kv = await self.store.get(key(ACME_DIR, "account"))
        account = AccountRecord.from_json(kv.value) if kv is not None else None
        if account is not None and account.directory == directory:
            account_key = self.box.unseal(base64.b64decode(account.sealed_key), AccountRecord.context(directory))
        else:
            account_key = new_key_pem()
        client = AcmeClient(directory, account_key_pem=account_key, ca_bundle=self.settings.ca_bundle,
                            email=self.settings.email)
        uri = await client.register()
        if account is None or account.uri != uri or account.directory != directory:
            sealed = base64.b64encode(self.box.seal(account_key, AccountRecord.context(directory))).decode()
            await self.store.put(key(ACME_DIR, "account"), AccountRecord(directory, uri, sealed).to_json())
            event(log, "ACME account registered", directory=directory, account=uri)
        self._client = client
        return client

    async def _order(self) -> tuple[Issued, bytes]:
        client = await self._account()
        key_pem = new_key_pem()
        issued = await client.order_dns01(self.settings.names, key_pem, self._publish, self._withdraw,
                                          deadline=self.settings.order_deadline)
        return issued, key_pem

    async def _publish(self, records: Mapping[str, tuple[str, ...]]) -> None:
        """Write the challenge TXT records and return once every live GeoDNS server serves them."""
        for name, values in records.items():
            rec = TxtRecord(name, tuple(values), ttl=self.settings.challenge_ttl)
            revision = await self.store.put(key("txt", rec.name), rec.to_json())
            await self.state.wait_change(revision - 1, timeout=10)  # the mirror has it: so do the feeds
        servers = dict(self.state.snapshot().dns_servers)
        if not servers:
            raise AcmeError("no live GeoDNS server is following the routing feed: nobody would answer the CA")
        for name, values in records.items():
            missing = await wait_all_serve(servers, name, values, deadline=self.settings.propagation_deadline)
            if missing:
                raise AcmeError(f"{name} TXT not served within {self.settings.propagation_deadline:g} s by "
                                f"GeoDNS server(s) {', '.join(sorted(missing))}")
        event(log, "challenge served by every GeoDNS server", names=",".join(records), servers=len(servers))

    async def _withdraw(self, records: Mapping[str, tuple[str, ...]]) -> None:
        for name in records:
            try:
                await self.store.txn(Txn().delete(key("txt", validate.owner_name("name", name))))
            except StoreUnavailableError as exc:  # a stale challenge TXT is harmless; logged
                event(log, "challenge TXT not withdrawn", logging.WARNING, name=name, error=str(exc))

    def statuses(self) -> list[RenewalStatus]:
        return list(self.state.snapshot().cert_status.values())

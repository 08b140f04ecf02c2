"""ACME HTTP-01 challenges answered by every gateway: written to etcd, sent over every session.

GeoDNS may send the CA to any region's gateway, so an HTTP-01 challenge must be answerable at
every gateway before the CA is told to validate. `Http01Challenges.publish(tokens)` writes each
`{token: key_authorization}` as `http01/<token>` (`coordinator.cert_records.Http01Record`) in
one transaction, bound to this replica's lease (an orderer that dies leaves no challenge
behind), and returns once:

1. this replica's mirror has the write (revision R);
2. every gateway whose session is open **on this replica** acked a challenge set of at least R
   (`Heartbeat.http_challenges_revision`, kept in `GatewayStats`); the sessions send the whole
   set whenever `http01/` changes (`GatewayControlService._add_http_challenges`);
3. when gateways have open sessions on **other** replicas (their `alive/<g>` says open, but
   their acks are in another process's memory), a grace (`--acme-http01-grace`, default 1 s)
   has passed: those replicas mirror the same write within milliseconds and send it at once.

A gateway of this replica that does not ack within `deadline` fails the publish, naming it (the
order fails and is retried with backoff), as for a GeoDNS server that does not serve a DNS-01
TXT. `withdraw(tokens)` deletes the keys; a failure there is logged (a stale challenge is
harmless, and goes with the lease anyway).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from coordinator.acme_client import AcmeError
from coordinator.cert_records import HTTP01_DIR, Http01Record
from coordinator.heartbeats import GatewayStats
from coordinator.state import State, key
from coordinator.store import EtcdStore, ReplicaLease, Txn
from geomesh import validate
from geomesh.errors import StoreUnavailableError, ValidationError
from geomesh.logs import event
from geomesh.model import SessionState

log = logging.getLogger("geomesh.coordinator.acme")

ACK_POLL = 0.05  # seconds between two looks at the gateways' acks while waiting


class Http01Challenges:
    """Publish and withdraw HTTP-01 challenges (see the module's docstring)."""

    def __init__(self, store: EtcdStore, state: State, lease: ReplicaLease, stats: GatewayStats, *,
                 grace: float = 1.0, deadline: float = 30.0) -> None:
        if not 0 <= grace <= 60:
            raise ValidationError("acme_http01_grace", f"{grace!r} is not 0..60 seconds")
        self.store = store
        self.state = state
        self.lease = lease
        self.stats = stats
        self.grace = grace
        self.deadline = deadline

    async def publish(self, tokens: Mapping[str, str]) -> None:
        """Write the challenges; return once every gateway answers them (see the module)."""
        try:
            records = [Http01Record(token, value) for token, value in tokens.items()]
        except ValidationError as exc:
            raise AcmeError(f"http-01 challenge from the CA: {exc}") from None
        if not records:
            return
        txn = Txn()
        lease_id = await self.lease.ensure()
        for rec in records:
            txn.put(key(HTTP01_DIR, rec.token), rec.to_json(), lease_id)
        revision = (await self.store.txn(txn)).revision
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline
        if not await self.state.wait_change(revision - 1, timeout=self.deadline):
            raise AcmeError(f"http-01 challenges written at revision {revision} did not reach this replica's "
                            f"mirror within {self.deadline:g} s")
        waiting = self.stats.unacked(revision)
        while waiting and loop.time() < end:
            await asyncio.sleep(ACK_POLL)
            waiting = self.stats.unacked(revision)
        if waiting:
            raise AcmeError(f"http-01 challenges not acked within {self.deadline:g} s by gateway(s) "
                            f"{', '.join(waiting)}")
        local = set(self.stats.reports)
        snap = self.state.snapshot()
        remote = sorted(g for g, s in snap.sessions.items() if s is SessionState.OPEN and g not in local)
        if remote and self.grace:
            await asyncio.sleep(self.grace)
        event(log, "http-01 challenges at every gateway", tokens=len(records), revision=revision,
              acked=len(local), other_replicas=len(remote), grace=self.grace if remote else 0)

    async def withdraw(self, tokens: Mapping[str, str]) -> None:
        txn = Txn()
        for token in tokens:
            try:
                txn.delete(key(HTTP01_DIR, validate.acme_token("token", token)))
            except ValidationError:
                continue  # never written
        if not txn.success:
            return
        try:
            await self.store.txn(txn)
        except StoreUnavailableError as exc:  # harmless: gone with the lease at the latest
            event(log, "http-01 challenges not withdrawn", logging.WARNING, tokens=len(tokens), error=str(exc))

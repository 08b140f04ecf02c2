"""One replica at a time for a background duty, elected through etcd on the replica's lease.

A duty (ordering certificates, `coordinator.acme_orders` with `acme/leader`; checking pinned
domains' TXT records, `coordinator.pinned_domains`) must run on one replica only.
`Leadership(store, lease, name).hold()` puts `<name>` (a key under `/geomesh/v1/`) only when it is
absent, bound to this replica's lease, and answers whether this replica holds it:
when the holder dies or is cut from etcd for longer than the lease TTL the key goes with its lease
and another replica takes it at its next call.
"""

from __future__ import annotations

import logging
import os
import socket

from coordinator.state import PREFIX
from coordinator.store import EtcdStore, ReplicaLease, Txn
from geomesh.logs import event

log = logging.getLogger("geomesh.coordinator.leadership")


def replica_id() -> str:
    """A name for this replica process, unique across restarts."""
    return f"{socket.gethostname()}/{os.getpid()}/{os.urandom(3).hex()}"


class Leadership:
    def __init__(self, store: EtcdStore, lease: ReplicaLease, name: str, replica: str | None = None) -> None:
        self.store = store
        self.lease = lease
        self.key = PREFIX + name.encode()
        self.name = name
        self.replica = replica or replica_id()
        self.held = False

    async def hold(self) -> bool:
        """Take the key if nobody holds it; True while this replica does (raises StoreUnavailableError)."""
        lease_id = await self.lease.ensure()
        result = await self.store.txn(Txn().absent(self.key).put(self.key, self.replica.encode(), lease_id)
                                      .else_get(self.key))
        if result.succeeded:
            held = True
        else:
            kv = result.ranges[0][0] if result.ranges and result.ranges[0] else None
            held = kv is not None and kv.value == self.replica.encode() and kv.lease == lease_id
        if held and not self.held:
            event(log, "this replica leads", duty=self.name, replica=self.replica)
        self.held = held
        return held

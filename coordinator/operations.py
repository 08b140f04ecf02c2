"""Every write the coordinator makes to etcd, each one transaction with the compares it needs.

The servicers validate and authorise, then call these. A write either applies whole or not at
all (one etcd txn); a lost race surfaces as ALREADY_EXISTS / FAILED_PRECONDITION, never as a
silent overwrite. After a write the call waits (briefly) until the coordinator's own cache has
seen it, so a read that follows on the same replica sees the write.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Mapping

from prometheus_client import Histogram

from coordinator.heartbeats import VoteMap
from coordinator.reach_keys import ReachRecord, alive_value, votes_to_json
from coordinator.state import State, key
from coordinator.store import EtcdStore, Txn
from geomesh.errors import (
    AlreadyExistsError,
    ExhaustedError,
    NotFoundError,
    PreconditionError,
)
from geomesh.model import App, Domain, Gateway, GatewayState, Instance, Region, SessionState

log = logging.getLogger("geomesh.coordinator.ops")

WATCH_LAG = Histogram("geomesh_coordinator_watch_lag_seconds",
                      "time from an acknowledged write until the coordinator's watch delivered it",
                      buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1))
IPAM_ATTEMPTS = 64
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops (compares and puts are each limited)


class Operations:
    def __init__(self, store: EtcdStore, state: State) -> None:
        self.store = store
        self.state = state
        self._taken: set[str] = set()  # mesh IPs seen taken in etcd after a lost race

    async def _commit(self, txn: Txn) -> tuple[bool, int]:
        result = await self.store.txn(txn)
        if result.succeeded:
            start = time.perf_counter()
            if await self.state.wait_change(result.revision - 1, timeout=2.0):
                WATCH_LAG.observe(time.perf_counter() - start)
        return result.succeeded, result.revision

    # -- regions -------------------------------------------------------------------------------

    async def create_region(self, region: Region) -> Region:
        ok, _ = await self._commit(Txn().absent(key("regions", region.name)).put(key("regions", region.name), region.to_json()))
        if not ok:
            raise AlreadyExistsError(f"region {region.name!r} exists")
        return region

    async def delete_region(self, name: str) -> None:
        if name not in self.state.regions:
            raise NotFoundError(f"region {name!r} does not exist")
        users = [g.name for g in self.state.gateways.values() if g.region == name]
        users += [i.key for i in self.state.instances.values() if i.region == name]
        if users:
            raise PreconditionError(f"region {name!r} still has gateways or instances: {', '.join(sorted(users)[:5])}")
        await self._commit(Txn().delete(key("regions", name)))

    # -- apps ----------------------------------------------------------------------------------

    def _check_regions(self, field: str, regions: tuple[str, ...]) -> None:
        for i, r in enumerate(regions):
            if r not in self.state.regions:
                raise NotFoundError(f"{field}[{i}]: region {r!r} does not exist")

    async def create_app(self, app: App) -> App:
        self._check_regions("pinned_regions", app.pinned_regions)
        ok, rev = await self._commit(Txn().absent(key("apps", app.name)).put(key("apps", app.name), app.to_json()))
        if not ok:
            raise AlreadyExistsError(f"app {app.name!r} exists")
        return dataclasses.replace(app, mod_revision=rev)

    async def update_app(self, app: App, expected_revision: int) -> App:
        current = self.state.apps.get(app.name)
        if current is None:
            raise NotFoundError(f"app {app.name!r} does not exist")
        self._check_regions("pinned_regions", app.pinned_regions)
        revision = expected_revision or current.mod_revision
        ok, rev = await self._commit(Txn().mod_equals(key("apps", app.name), revision).put(key("apps", app.name), app.to_json()))
        if not ok:
            raise PreconditionError(f"app {app.name!r} changed since revision {revision}: read it again")
        return dataclasses.replace(app, mod_revision=rev)

    async def delete_app(self, name: str) -> None:
        if name not in self.state.apps:
            raise NotFoundError(f"app {name!r} does not exist")
        domains = sorted(d.fqdn for d in self.state.domains.values() if d.app == name)
        if domains:
            raise PreconditionError(f"app {name!r} is used by domains {', '.join(domains[:5])}: remove them first")
        await self._commit(Txn().delete(key("apps", name)).delete(key("instances", f"{name}/"), prefix=True))

    # -- instances -----------------------------------------------------------------------------

    async def add_instance(self, inst: Instance) -> Instance:
        if inst.app not in self.state.apps:
            raise NotFoundError(f"app: {inst.app!r} does not exist")
        if inst.region not in self.state.regions:
            raise NotFoundError(f"region: {inst.region!r} does not exist")
        k = key("instances", inst.key)
        ok, _ = await self._commit(Txn().absent(k).mod_equals(key("apps", inst.app), self.state.apps[inst.app].mod_revision)
                                   .put(k, inst.to_json()))
        if not ok:
            if inst.key in self.state.instances:
                raise AlreadyExistsError(f"instance {inst.key!r} exists")
            raise PreconditionError(f"app {inst.app!r} changed while adding the instance: retry")
        return inst

    async def remove_instance(self, app: str, instance_id: str) -> Instance:
        name = f"{app}/{instance_id}"
        inst = self.state.instances.get(name)
        if inst is None:
            raise NotFoundError(f"instance {name!r} does not exist")
        await self._commit(Txn().delete(key("instances", name)))
        return inst

    async def set_instance_health(self, inst: Instance, healthy: bool) -> None:
        if inst.healthy == healthy:
            return
        raw = self.state.raw["instances"].get(inst.key)
        if raw is None:
            return
        await self._commit(Txn().mod_equals(raw.key, raw.mod_revision)
                           .put(raw.key, dataclasses.replace(inst, healthy=healthy).to_json()))

    async def set_instances_health(self, changes: Mapping[str, bool]) -> bool:
        """Write the health of several instances ("app/id" -> healthy), only those whose cached
        health differs, in as few transactions as etcd allows (each compares every instance's
        mod revision). False when an instance changed meanwhile: the caller offers the batch again."""
        writes = []
        for name, healthy in changes.items():
            inst, raw = self.state.instances.get(name), self.state.raw["instances"].get(name)
            if inst is not None and raw is not None and inst.healthy != healthy:
                writes.append((raw, dataclasses.replace(inst, healthy=healthy)))
        ok = True
        for start in range(0, len(writes), MAX_TXN_OPS):
            txn = Txn()
            for raw, updated in writes[start:start + MAX_TXN_OPS]:
                txn.mod_equals(raw.key, raw.mod_revision).put(raw.key, updated.to_json())
            ok = (await self._commit(txn))[0] and ok
        return ok

    # -- domains -------------------------------------------------------------------------------

    async def add_domain(self, domain: Domain) -> Domain:
        if domain.app not in self.state.apps:
            raise NotFoundError(f"app: {domain.app!r} does not exist")
        ok, _ = await self._commit(Txn().absent(key("domains", domain.fqdn)).put(key("domains", domain.fqdn), domain.to_json()))
        if not ok:
            raise AlreadyExistsError(f"domain {domain.fqdn!r} exists")
        return domain

    async def remove_domain(self, fqdn: str) -> None:
        if fqdn not in self.state.domains:
            raise NotFoundError(f"domain {fqdn!r} does not exist")
        await self._commit(Txn().delete(key("domains", fqdn)))

    # -- gateways ------------------------------------------------------------------------------

    async def register_gateway(self, gw: Gateway) -> Gateway:
        """Create or update a gateway's record; a new gateway gets a fresh mesh IP.

        The mesh IP is claimed with `ipam/<ip>` created-if-absent in the same transaction that
        creates the gateway, so two registrations (on any replicas) can never get the same IP.
        """
        if gw.region not in self.state.regions:
            raise NotFoundError(f"region: {gw.region!r} does not exist")
        gkey = key("gateways", gw.name)
        for _ in range(IPAM_ATTEMPTS):
            current = await self.store.get(gkey)
            if current is not None:
                existing = Gateway.from_json(current.value)
                updated = dataclasses.replace(gw, mesh_ip=existing.mesh_ip, state=existing.state)
                ok, rev = await self._commit(Txn().mod_equals(gkey, current.mod_revision).put(gkey, updated.to_json()))
                if ok:
                    return dataclasses.replace(updated, mod_revision=rev)
                continue
            ip = await self._candidate_ip()
            new = dataclasses.replace(gw, mesh_ip=ip, state=GatewayState.ACTIVE)
            ok, rev = await self._commit(Txn().absent(gkey).absent(key("ipam", ip))
                                         .put(key("ipam", ip), gw.name.encode()).put(gkey, new.to_json()))
            if ok:
                return dataclasses.replace(new, mod_revision=rev)
            # lost a race (the ip or the name): read etcd afresh and try again
            _rev, kvs = await self.store.get_prefix(key("ipam", ""))
            self._taken = {kv.key.decode().rsplit("/", 1)[-1] for kv in kvs}
        raise ExhaustedError(f"could not claim a mesh address for {gw.name!r} after {IPAM_ATTEMPTS} attempts")

    async def _candidate_ip(self) -> str:
        taken = self._taken | set(self.state.ipam)
        free = []
        for host in self.state.mesh_network.hosts():
            ip = str(host)
            if ip not in taken:
                free.append(ip)
                if len(free) >= 8:
                    break
        if not free:
            raise ExhaustedError(f"mesh range {self.state.mesh_network} has no free address")
        # a little randomness among the lowest free addresses keeps concurrent replicas apart
        return random.choice(free)

    async def set_gateway_state(self, name: str, state: GatewayState) -> Gateway:
        raw = self.state.raw["gateways"].get(name)
        gw = self.state.gateways.get(name)
        if raw is None or gw is None:
            raise NotFoundError(f"gateway {name!r} does not exist")
        if gw.state is state:
            return self.state.gateway(name) or gw
        ok, _ = await self._commit(Txn().mod_equals(raw.key, raw.mod_revision)
                                   .put(raw.key, dataclasses.replace(gw, state=state).to_json()))
        if not ok:
            raise PreconditionError(f"gateway {name!r} changed concurrently: retry")
        return self.state.gateway(name) or gw

    async def remove_gateway(self, name: str) -> None:
        gw = self.state.gateways.get(name)
        if gw is None:
            raise NotFoundError(f"gateway {name!r} does not exist")
        txn = (Txn().delete(key("gateways", name)).delete(key("alive", name))
               .delete(key("votes", name)).delete(key("reach", name)))
        if gw.mesh_ip:
            txn.delete(key("ipam", gw.mesh_ip))
        await self._commit(txn)

    async def mark_alive(self, name: str, lease_id: int) -> int:
        """alive/<g> = {"session": "open"}, bound to this replica's lease (a reconnecting gateway
        takes it over); returns the revision of the put, which `clear_alive` compares against."""
        _ok, rev = await self._commit(Txn().put(key("alive", name), alive_value(SessionState.OPEN), lease=lease_id))
        return rev

    async def mark_timed_out(self, name: str, revision: int, lease_id: int) -> bool:
        """alive/<g> = {"session": "timed_out"} (same lease) unless another session wrote it since
        `revision`: the gateway stays alive until the probes say it is unreachable."""
        k = key("alive", name)
        ok, _ = await self._commit(Txn().mod_equals(k, revision).put(k, alive_value(SessionState.TIMED_OUT),
                                                                         lease=lease_id))
        return ok

    async def write_votes(self, prober: str, votes: VoteMap) -> bool:
        """votes/<prober> = its vote map, while the gateway exists (False: it was removed)."""
        ok, _ = await self._commit(Txn().present(key("gateways", prober)).put(key("votes", prober), votes_to_json(votes)))
        return ok

    async def write_reach(self, records: Mapping[str, tuple[ReachRecord, int]]) -> bool:
        """reach/<g> for each gateway -> (record, mod revision the decision was made from; 0:
        absent), of gateways that still exist, in as few transactions as etcd allows. False when a
        key changed meanwhile (another replica wrote the same decision first, or a newer one)."""
        items = sorted(records.items())
        ok = True
        per_txn = MAX_TXN_OPS // 2  # two compares per key
        for start in range(0, len(items), per_txn):
            txn = Txn()
            for name, (record, revision) in items[start:start + per_txn]:
                k = key("reach", name)
                txn.present(key("gateways", name)).mod_equals(k, revision).put(k, record.to_json())
            ok = (await self._commit(txn))[0] and ok
        return ok

    async def clear_alive(self, name: str, revision: int) -> None:
        """Delete alive/<g> unless another session (any replica) has written it since `revision`."""
        k = key("alive", name)
        await self._commit(Txn().mod_equals(k, revision).delete(k))

"""Every write the coordinator makes to etcd, each one transaction with the compares it needs.

The servicers validate and authorise, then call these. A write either applies whole or not at
all (one etcd txn); a lost race surfaces as ALREADY_EXISTS / FAILED_PRECONDITION, never as a
silent overwrite. After a write the call waits (briefly) until the coordinator's own cache has
seen it, so a read that follows on the same replica sees the write.

Integrity lives inside the transaction (probe finding 8, `coordinator.integrity` has the key
layout): a referenced region or app is compared to exist, a deleted one to have no index key
under its `refs/` prefix, and each uniqueness rule is an index key created if absent (an instance
id within its region and against app names, WireGuard public keys, instance subnets, mesh IPs).
The cache is read first only to answer with a friendly message; when the transaction's compares
fail, reads in its failure branch (same revision) say which rule broke. Write-time policy: an
instance address is a unicast address (`validate.instance_address`; loopback only with
`allow_loopback_instances`), a subnet is not /0 and is disjoint from the others and from the mesh
range, the all-zero WireGuard key is refused. Bad input is INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aetcd import rpc
from prometheus_client import Counter, Histogram

from coordinator import integrity as ix
from coordinator.heartbeats import VoteMap
from coordinator.reach_keys import ReachRecord, alive_value, votes_to_json
from coordinator.state import State, key
from coordinator.store import KV, EtcdStore, Txn, prefix_end
from geomesh import validate
from geomesh.errors import (
    AlreadyExistsError,
    ExhaustedError,
    GeomeshError,
    NotFoundError,
    PreconditionError,
    ValidationError,
)
from geomesh.model import App, Domain, Gateway, GatewayState, Instance, Region, SessionState

log = logging.getLogger("geomesh.coordinator.ops")

WATCH_LAG = Histogram("geomesh_coordinator_watch_lag_seconds",
                      "time from an acknowledged write until the coordinator's watch delivered it",
                      buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1))
REFUSED = Counter("geomesh_coordinator_integrity_refusals_total",
                  "writes refused by a referential or uniqueness rule, found in the cache or in the transaction",
                  ["rule"])
IPAM_ATTEMPTS = 64
ATTEMPTS = 16  # rounds of a write whose compares lost a race that may go away (cache behind etcd)
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops (compares and puts are each limited)


@dataclass(slots=True)
class _Guarded:
    """A transaction plus, per rule, a read in its failure branch and what that read means.

    `explain(ranges)` turns the failure reads (taken at the failed transaction's revision) into
    the first broken rule's error, or None when no rule explains it (a revision compare lost)."""

    txn: Txn = field(default_factory=Txn)
    rules: list[tuple[str, Callable[[list[KV]], GeomeshError | None]]] = field(default_factory=list)

    def _read(self, k: bytes, *, prefix: bool = False) -> None:
        self.txn.failure.append(rpc.RequestOp(request_range=rpc.RangeRequest(
            key=k, range_end=prefix_end(k) if prefix else b"", limit=5, keys_only=prefix)))

    def exists(self, k: bytes, rule: str, error: GeomeshError) -> _Guarded:
        self.txn.present(k)
        self._read(k)
        self.rules.append((rule, lambda kvs: None if kvs else error))
        return self

    def absent(self, k: bytes, rule: str, error: Callable[[KV], GeomeshError]) -> _Guarded:
        self.txn.absent(k)
        self._read(k)
        self.rules.append((rule, lambda kvs: error(kvs[0]) if kvs else None))
        return self

    def none_under(self, prefix: bytes, rule: str, error: Callable[[list[str]], GeomeshError]) -> _Guarded:
        """No key starts with `prefix` (a range compare: etcd checks every key of the range)."""
        self.txn.compares.append(rpc.Compare(key=prefix, range_end=prefix_end(prefix), result=rpc.Compare.EQUAL,
                                             target=rpc.Compare.CREATE, create_revision=0))
        self._read(prefix, prefix=True)
        self.rules.append((rule, lambda kvs: error([kv.key[len(prefix):].decode() for kv in kvs]) if kvs else None))
        return self

    def unchanged_under(self, prefix: bytes, revision: int) -> _Guarded:
        """No key under `prefix` was created or modified after `revision` (deletions pass)."""
        self.txn.compares.append(rpc.Compare(key=prefix, range_end=prefix_end(prefix), result=rpc.Compare.LESS,
                                             target=rpc.Compare.MOD, mod_revision=revision + 1))
        return self

    def explain(self, ranges: list[list[KV]]) -> GeomeshError | None:
        for (rule, judge), kvs in zip(self.rules, ranges, strict=False):
            error = judge(kvs)
            if error is not None:
                REFUSED.labels(rule).inc()
                return error
        return None


def _refuse(rule: str, error: GeomeshError) -> GeomeshError:
    REFUSED.labels(rule).inc()
    return error


def _listing(names: list[str]) -> str:
    return ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")


class Operations:
    def __init__(self, store: EtcdStore, state: State, *, allow_loopback_instances: bool = False) -> None:
        self.store = store
        self.state = state
        self.allow_loopback_instances = allow_loopback_instances  # tests and the loopback lab only
        self._taken: set[str] = set()  # mesh IPs seen taken in etcd after a lost race

    async def _commit(self, txn: Txn) -> tuple[bool, int]:
        result = await self.store.txn(txn)
        if result.succeeded:
            await self._seen(result.revision)
        return result.succeeded, result.revision

    async def _seen(self, revision: int) -> None:
        start = time.perf_counter()
        if await self.state.wait_change(revision - 1, timeout=2.0):
            WATCH_LAG.observe(time.perf_counter() - start)

    async def _run(self, g: _Guarded) -> int | None:
        """Commit a guarded transaction: its revision, or raise the broken rule's error; None
        when only a revision compare lost (the caller reads again and retries)."""
        result = await self.store.txn(g.txn)
        if result.succeeded:
            await self._seen(result.revision)
            return result.revision
        error = g.explain(result.ranges)
        if error is not None:
            raise error
        await self.state.wait_change(self.state.revision, timeout=0.2)  # let the cache catch up
        return None

    # -- regions -------------------------------------------------------------------------------

    def _subnet_clash(self, name: str, subnet: str) -> None:
        if not subnet:
            return
        net = ipaddress.ip_network(subnet)
        for other in sorted(self.state.regions.values(), key=lambda r: r.name):
            if other.instance_subnet and other.name != name:
                theirs = ipaddress.ip_network(other.instance_subnet)
                if theirs.version == net.version and theirs.overlaps(net):  # type: ignore[arg-type]
                    raise _refuse("subnet", ValidationError(
                        "instance_subnet", f"{subnet} overlaps region {other.name!r}'s {other.instance_subnet}"))

    async def create_region(self, region: Region) -> Region:
        subnet = validate.instance_subnet("instance_subnet", region.instance_subnet, mesh=str(self.state.mesh_network))
        if region.name in self.state.regions:
            raise AlreadyExistsError(f"region {region.name!r} exists")
        self._subnet_clash(region.name, subnet)
        rkey = key("regions", region.name)
        g = _Guarded().absent(rkey, "exists", lambda _kv: AlreadyExistsError(f"region {region.name!r} exists"))
        g.txn.put(rkey, region.to_json())
        if subnet:
            # disjoint from every claimed subnet: none inside it, none containing it (integrity.py)
            claim, larger = ix.subnet_overlap_keys(subnet)
            g.none_under(claim, "subnet", lambda _keys: ValidationError(
                "instance_subnet", f"{subnet} overlaps another region's subnet"))
            for k in larger:
                g.txn.absent(k)
            g.txn.put(claim, region.name.encode())
        if await self._run(g) is None:
            raise _refuse("subnet", ValidationError("instance_subnet", f"{subnet} overlaps another region's subnet"))
        return region

    async def delete_region(self, name: str) -> None:
        for _ in range(ATTEMPTS):
            region = self.state.regions.get(name)
            if region is None:
                raise NotFoundError(f"region {name!r} does not exist")
            users = [f"gateway {g.name}" for g in self.state.gateways.values() if g.region == name]
            users += [f"instance {i.key}" for i in self.state.instances.values() if i.region == name]
            users += [f"app {a.name} (pinned)" for a in self.state.apps.values() if name in a.pinned_regions]
            enrolled = self._enrolled_in(name)
            users += [f"enrollment {e}" for e in enrolled]
            if users:
                raise _refuse("in_use", PreconditionError(f"region {name!r} is still used by {_listing(users)}"))
            rkey = key("regions", name)
            g = _Guarded().exists(rkey, "exists", NotFoundError(f"region {name!r} does not exist"))
            g.none_under(ix.region_refs(name), "in_use", lambda refs: PreconditionError(
                f"region {name!r} is still used by {_listing(refs)}"))
            g.txn.mod_equals(rkey, self.state.raw["regions"][name].mod_revision)
            # gateway enrollments name a region too: none in the cache, and none written since
            g.unchanged_under(key("enrollments", ""), self.state.revision)
            g.txn.delete(rkey)
            if region.instance_subnet:
                g.txn.delete(ix.subnet_claim(region.instance_subnet))
            if await self._run(g) is not None:
                return
        raise PreconditionError(f"region {name!r} kept changing while deleting it: retry")

    def _enrolled_in(self, region: str) -> list[str]:
        out = []
        for name, kv in self.state.raw.get("enrollments", {}).items():
            try:
                if json.loads(kv.value).get("region") == region:
                    out.append(name)
            except ValueError:
                continue
        return out

    # -- apps ----------------------------------------------------------------------------------

    def _check_regions(self, field_name: str, regions: tuple[str, ...]) -> None:
        for i, r in enumerate(regions):
            if r not in self.state.regions:
                raise _refuse("region_exists", NotFoundError(f"{field_name}[{i}]: region {r!r} does not exist"))

    def _check_app_name(self, name: str) -> None:
        users = sorted(i.key for i in self.state.instances.values() if i.id == name)
        if users:
            raise _refuse("name", ValidationError("name", f"{name!r} is the id of instance {users[0]!r}: "
                                                           "app names and instance ids share the zone"))

    def _guard_pins(self, g: _Guarded, pinned: tuple[str, ...]) -> None:
        for i, r in enumerate(pinned):
            g.exists(key("regions", r), "region_exists",
                     NotFoundError(f"pinned_regions[{i}]: region {r!r} does not exist"))

    async def create_app(self, app: App) -> App:
        self._check_regions("pinned_regions", app.pinned_regions)
        self._check_app_name(app.name)
        akey = key("apps", app.name)
        g = _Guarded().absent(akey, "exists", lambda _kv: AlreadyExistsError(f"app {app.name!r} exists"))
        self._guard_pins(g, app.pinned_regions)
        g.none_under(ix.instance_names(app.name), "name", lambda ids: ValidationError(
            "name", f"{app.name!r} is an instance id (in {_listing(ids)}): app names and instance ids share the zone"))
        g.txn.put(akey, app.to_json())
        for r in app.pinned_regions:
            g.txn.put(ix.region_ref(r, "apps", app.name), app.name.encode())
        rev = await self._run(g)
        if rev is None:
            raise PreconditionError(f"app {app.name!r} changed while creating it: retry")
        return dataclasses.replace(app, mod_revision=rev)

    async def update_app(self, app: App, expected_revision: int) -> App:
        current = self.state.apps.get(app.name)
        if current is None:
            raise NotFoundError(f"app {app.name!r} does not exist")
        if expected_revision and expected_revision != current.mod_revision:
            await self.state.wait_change(expected_revision - 1, timeout=2.0)  # read on a faster replica?
            current = self.state.apps.get(app.name)
            if current is None:
                raise NotFoundError(f"app {app.name!r} does not exist")
            if expected_revision != current.mod_revision:
                raise PreconditionError(f"app {app.name!r} changed since revision {expected_revision}: read it again")
        self._check_regions("pinned_regions", app.pinned_regions)
        revision = current.mod_revision  # its stored pins are the cached ones: their refs are replaced
        akey = key("apps", app.name)
        g = _Guarded().exists(akey, "exists", NotFoundError(f"app {app.name!r} does not exist"))
        self._guard_pins(g, app.pinned_regions)
        g.txn.mod_equals(akey, revision).put(akey, app.to_json())
        for r in set(current.pinned_regions) - set(app.pinned_regions):
            g.txn.delete(ix.region_ref(r, "apps", app.name))
        for r in app.pinned_regions:
            g.txn.put(ix.region_ref(r, "apps", app.name), app.name.encode())
        rev = await self._run(g)
        if rev is None:
            raise PreconditionError(f"app {app.name!r} changed since revision {revision}: read it again")
        return dataclasses.replace(app, mod_revision=rev)

    async def delete_app(self, name: str) -> None:
        for _ in range(ATTEMPTS):
            app = self.state.apps.get(name)
            if app is None:
                raise NotFoundError(f"app {name!r} does not exist")
            users = [f"domain {d.fqdn}" for d in self.state.domains.values() if d.app == name]
            users += [f"instance {i.key}" for i in self.state.instances.values() if i.app == name]
            if users:
                raise _refuse("in_use", PreconditionError(f"app {name!r} is still used by {_listing(users)}: "
                                                          "remove them first"))
            akey = key("apps", name)
            g = _Guarded().exists(akey, "exists", NotFoundError(f"app {name!r} does not exist"))
            g.none_under(ix.app_instances(name), "in_use", lambda ids: PreconditionError(
                f"app {name!r} still has instances {_listing(ids)}: remove them first"))
            g.none_under(ix.app_refs(name), "in_use", lambda refs: PreconditionError(
                f"app {name!r} is still used by {_listing(refs)}: remove them first"))
            g.txn.mod_equals(akey, app.mod_revision).delete(akey)
            for r in app.pinned_regions:
                g.txn.delete(ix.region_ref(r, "apps", name))
            if await self._run(g) is not None:
                return
        raise PreconditionError(f"app {name!r} kept changing while deleting it: retry")

    # -- instances -----------------------------------------------------------------------------

    async def add_instance(self, inst: Instance) -> Instance:
        validate.instance_address("address", inst.address, allow_loopback=self.allow_loopback_instances)
        if inst.key in self.state.instances:
            raise AlreadyExistsError(f"instance {inst.key!r} exists")
        if inst.app not in self.state.apps:
            raise _refuse("app_exists", NotFoundError(f"app: {inst.app!r} does not exist"))
        if inst.region not in self.state.regions:
            raise _refuse("region_exists", NotFoundError(f"region: {inst.region!r} does not exist"))
        if inst.id in self.state.apps:
            raise _refuse("id", ValidationError("id", f"{inst.id!r} is an app name: app names and instance ids "
                                                      "share the zone"))
        for other in self.state.instances.values():
            if other.id == inst.id and other.region == inst.region:
                raise _refuse("id", ValidationError("id", f"{inst.id!r} is used by instance {other.key!r} in region "
                                                          f"{inst.region!r}: ids are unique within a region"))
        k = key("instances", inst.key)
        g = _Guarded().absent(k, "exists", lambda _kv: AlreadyExistsError(f"instance {inst.key!r} exists"))
        g.exists(key("apps", inst.app), "app_exists", NotFoundError(f"app: {inst.app!r} does not exist"))
        g.exists(key("regions", inst.region), "region_exists", NotFoundError(f"region: {inst.region!r} does not exist"))
        g.absent(ix.region_ref(inst.region, "instances", inst.id), "id", lambda kv: ValidationError(
            "id", f"{inst.id!r} is used by instance {kv.value.decode()!r} in region {inst.region!r}: "
                  "ids are unique within a region"))
        g.absent(key("apps", inst.id), "id", lambda _kv: ValidationError(
            "id", f"{inst.id!r} is an app name: app names and instance ids share the zone"))
        g.txn.put(k, inst.to_json())
        for ik, iv in ix.index_keys("instances", inst.key, inst.to_json()).items():
            g.txn.put(ik, iv)
        if await self._run(g) is None:
            raise PreconditionError(f"instance {inst.key!r}: a concurrent change got in the way: retry")
        return inst

    async def remove_instance(self, app: str, instance_id: str) -> Instance:
        name = f"{app}/{instance_id}"
        k = key("instances", name)
        for _ in range(ATTEMPTS):
            current = await self.store.get(k)  # health writes move its revision: read it afresh
            if current is None:
                raise NotFoundError(f"instance {name!r} does not exist")
            inst = Instance.from_json(current.value)
            txn = Txn().mod_equals(k, current.mod_revision).delete(k)
            for ik in ix.index_keys("instances", name, current.value):
                txn.delete(ik)
            if (await self._commit(txn))[0]:
                return inst
        raise PreconditionError(f"instance {name!r} kept changing while removing it: retry")
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
        """Pin a domain to an app; it is pending (`verified` false, whatever the caller sent) until
        the coordinator sees its TXT record name the app (`coordinator.pinned_domains`)."""
        domain = dataclasses.replace(domain, verified=False)
        if domain.fqdn in self.state.domains:
            raise AlreadyExistsError(f"domain {domain.fqdn!r} exists")
        if domain.app not in self.state.apps:
            raise _refuse("app_exists", NotFoundError(f"app: {domain.app!r} does not exist"))
        dkey = key("domains", domain.fqdn)
        g = _Guarded().absent(dkey, "exists", lambda _kv: AlreadyExistsError(f"domain {domain.fqdn!r} exists"))
        g.exists(key("apps", domain.app), "app_exists", NotFoundError(f"app: {domain.app!r} does not exist"))
        g.txn.put(dkey, domain.to_json()).put(ix.app_domain_ref(domain.app, domain.fqdn), domain.fqdn.encode())
        if await self._run(g) is None:
            raise PreconditionError(f"domain {domain.fqdn!r}: a concurrent change got in the way: retry")
        return domain

    async def set_domain_verified(self, fqdn: str, app: str, verified: bool) -> bool:
        """The TXT checker's verdict on a pinned domain; False when the domain is gone or pinned to
        another app than `app` meanwhile (nothing written)."""
        k = key("domains", fqdn)
        for _ in range(ATTEMPTS):
            current = await self.store.get(k)
            if current is None:
                return False
            domain = Domain.from_json(current.value)
            if domain.app != app:
                return False
            if domain.verified == verified:
                return True
            changed = dataclasses.replace(domain, verified=verified)
            if (await self._commit(Txn().mod_equals(k, current.mod_revision).put(k, changed.to_json())))[0]:
                return True
        raise PreconditionError(f"domain {fqdn!r} kept changing while marking it verified: retry")

    async def remove_domain(self, fqdn: str) -> None:
        k = key("domains", fqdn)
        for _ in range(ATTEMPTS):
            current = await self.store.get(k)
            if current is None:
                raise NotFoundError(f"domain {fqdn!r} does not exist")
            txn = Txn().mod_equals(k, current.mod_revision).delete(k)
            for ik in ix.index_keys("domains", fqdn, current.value):
                txn.delete(ik)
            if (await self._commit(txn))[0]:
                return
        raise PreconditionError(f"domain {fqdn!r} kept changing while removing it: retry")

    # -- gateways ------------------------------------------------------------------------------

    async def register_gateway(self, gw: Gateway, guard: tuple[bytes, int] | None = None) -> Gateway:
        """Create or update a gateway's record; a new gateway gets a fresh mesh IP.

        The mesh IP is claimed with `ipam/<ip>` created-if-absent in the same transaction that
        creates the gateway, so two registrations (on any replicas) can never get the same IP;
        its WireGuard public key likewise with `wgkeys/<key>` (probe finding 9: one key, one
        gateway), and its region is compared to exist, with `refs/regions/<r>/gateways/<g>`
        written beside the record.
        `guard` (key, mod revision): the write also compares it (the gateway's enrollment,
        `coordinator.enrollment`); PreconditionError when it changed.
        """
        if gw.wg_public_key == ix.ZERO_WG_KEY:
            raise _refuse("wg_key", ValidationError("wg_public_key", "is the all-zero key: not a usable WireGuard key"))
        if gw.region not in self.state.regions:
            raise _refuse("region_exists", NotFoundError(f"region: {gw.region!r} does not exist"))
        gkey = key("gateways", gw.name)
        wkey = ix.wg_key_claim(gw.wg_public_key)
        for _ in range(IPAM_ATTEMPTS):
            current = await self.store.get(gkey)
            claim = await self.store.get(wkey)
            if claim is not None and claim.value.decode() != gw.name:
                raise _refuse("wg_key", AlreadyExistsError(
                    f"wg_public_key: the key is registered by gateway {claim.value.decode()!r}"))
            g = _Guarded().exists(key("regions", gw.region), "region_exists",
                                  NotFoundError(f"region: {gw.region!r} does not exist"))
            g.txn.mod_equals(wkey, 0 if claim is None else claim.mod_revision)
            if guard is not None:
                g.txn.mod_equals(*guard)
            if current is not None:
                existing = Gateway.from_json(current.value)
                updated = dataclasses.replace(gw, mesh_ip=existing.mesh_ip, state=existing.state)
                g.txn.mod_equals(gkey, current.mod_revision)
                old = ix.index_keys("gateways", gw.name, current.value)
                new_keys = ix.index_keys("gateways", gw.name, updated.to_json())
                for ik in old.keys() - new_keys.keys():
                    g.txn.delete(ik)
                for ik, iv in new_keys.items():
                    g.txn.put(ik, iv)
                g.txn.put(gkey, updated.to_json())
                rev = await self._run(g)
                if rev is not None:
                    return dataclasses.replace(updated, mod_revision=rev)
                await self._check_guard(gw.name, guard)
                continue
            ip = await self._candidate_ip()
            new = dataclasses.replace(gw, mesh_ip=ip, state=GatewayState.ACTIVE)
            g.txn.absent(gkey).absent(key("ipam", ip))
            for ik, iv in ix.index_keys("gateways", gw.name, new.to_json()).items():
                g.txn.put(ik, iv)
            g.txn.put(gkey, new.to_json())
            rev = await self._run(g)
            if rev is not None:
                return dataclasses.replace(new, mod_revision=rev)
            await self._check_guard(gw.name, guard)
            # lost a race (the ip, the name or the key): read etcd afresh and try again
            _rev, kvs = await self.store.get_prefix(key("ipam", ""))
            self._taken = {kv.key.decode().rsplit("/", 1)[-1] for kv in kvs}
        raise ExhaustedError(f"could not claim a mesh address for {gw.name!r} after {IPAM_ATTEMPTS} attempts")

    async def _check_guard(self, name: str, guard: tuple[bytes, int] | None) -> None:
        if guard is not None:
            kv = await self.store.get(guard[0])
            if (0 if kv is None else kv.mod_revision) != guard[1]:
                raise PreconditionError(f"gateway {name!r}: its enrollment changed while registering: retry")

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
        gkey = key("gateways", name)
        for _ in range(ATTEMPTS):
            current = await self.store.get(gkey)
            if current is None:
                raise NotFoundError(f"gateway {name!r} does not exist")
            txn = (Txn().mod_equals(gkey, current.mod_revision).delete(gkey).delete(key("alive", name))
                   .delete(key("votes", name)).delete(key("reach", name)))
            for ik in ix.index_keys("gateways", name, current.value):
                if ik == ix.wg_key_claim(Gateway.from_json(current.value).wg_public_key):
                    claim = await self.store.get(ik)  # an older record may share a key: delete only ours
                    if claim is None or claim.value.decode() != name:
                        continue
                    txn.mod_equals(ik, claim.mod_revision)
                txn.delete(ik)
            if (await self._commit(txn))[0]:
                return
        raise PreconditionError(f"gateway {name!r} kept changing while removing it: retry")

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

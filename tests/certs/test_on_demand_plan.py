"""The ordering leader's rounds for custom domains' certificates, as tables with a fixed clock
(`coordinator.on_demand_orders.plan`): which requests are ordered (at once, after the backoff,
never twice at a time, at most `parallel`), which custom certificates are renewed or have their
TXT record checked again, which requests are given up and which statuses forgotten."""

from __future__ import annotations

from types import MappingProxyType

from coordinator.cert_records import CertificateRecord, CertRequest, RenewalStatus
from coordinator.domain_txt import TxtVerdict
from coordinator.on_demand_orders import Forget, Memory, Order, Recheck, keeps, plan
from coordinator.renewal import DAY, RenewalPolicy
from coordinator.snapshot import Snapshot
from geomesh.app_address import AppAddress

ZONE = "geo.test"
NOW = 1_000_000.0
POLICY = RenewalPolicy(renew_before=30 * DAY, retry_base=30, retry_max=3600)


def snap(requests=(), certs=(), statuses=()) -> Snapshot:
    return Snapshot(1, cert_requests=MappingProxyType({r.name: r for r in requests}),
                    certs=MappingProxyType({c.name: c for c in certs}),
                    cert_status=MappingProxyType({s.name: s for s in statuses}))


def request(name: str, age: float = 1.0) -> CertRequest:
    return CertRequest(name, "web", "gw-a", NOW - age)


def cert(name: str, expires_in: float = 60 * DAY) -> CertificateRecord:
    return CertificateRecord(name, (name,), "chain", NOW + expires_in, "0a", "sealed")


def run(s: Snapshot, memory: Memory | None = None, parallel: int = 4):  # noqa: ANN201
    return plan(s, ZONE, memory or Memory(), NOW, POLICY, verify_interval=600, max_failures=5, parallel=parallel)


def test_a_new_request_is_ordered_at_once_without_a_second_txt_look_up() -> None:
    r = run(snap([request("shop.example")]))
    assert r.orders == (Order("shop.example", ("shop.example",), recheck=False, request=True),)


def test_an_old_request_has_its_txt_record_looked_up_again_first() -> None:
    r = run(snap([request("shop.example", age=120)]))
    assert r.orders[0].recheck is True


def test_a_failed_request_waits_for_its_backoff_then_is_given_up() -> None:
    failing = RenewalStatus("shop.example", renew_at=NOW + 60, failures=2, last_error="CA down")
    r = run(snap([request("shop.example")], statuses=[failing]))
    assert r.orders == () and r.wake_at == NOW + 60
    due = RenewalStatus("shop.example", renew_at=NOW - 1, failures=2)
    assert [o.name for o in run(snap([request("shop.example")], statuses=[due])).orders] == ["shop.example"]
    given_up = RenewalStatus("shop.example", renew_at=NOW + 60, failures=5)
    r = run(snap([request("shop.example")], statuses=[given_up]))
    assert r.drop_requests == ("shop.example",) and r.orders == ()


def test_never_twice_at_a_time_and_at_most_parallel() -> None:
    names = [f"d{i}.example" for i in range(6)]
    memory = Memory(running={"d0.example"})
    r = run(snap([request(n) for n in names]), memory, parallel=3)
    assert [o.name for o in r.orders] == ["d1.example", "d2.example"]


def test_custom_certificates_renewed_and_rechecked_the_zone_left_alone() -> None:
    memory = Memory(checked={"fresh.example": NOW - 10})
    s = snap(certs=[cert(ZONE, expires_in=DAY), cert("old.example", expires_in=DAY),
                    cert("fresh.example"), cert("stale.example")])
    r = run(s, memory)
    assert r.orders == (Order("old.example", ("old.example",), recheck=True, request=False),)
    assert r.rechecks == (Recheck("stale.example"),)  # fresh.example was looked at 10 s ago
    assert r.wake_at == NOW - 10 + 600


def test_a_request_for_a_certificate_held_is_done() -> None:
    r = run(snap([request("shop.example")], certs=[cert("shop.example")]))
    assert r.done_requests == ("shop.example",) and r.orders == () and r.rechecks == ()


def test_statuses_left_behind_are_forgotten_after_the_longest_backoff() -> None:
    s = snap(statuses=[RenewalStatus("gone.example", renew_at=NOW - 3601, failures=1),
                       RenewalStatus("recent.example", renew_at=NOW - 10, failures=1),
                       RenewalStatus(ZONE, renew_at=NOW - 99999, failures=3)])
    assert run(s).forget == (Forget("gone.example"),)


def test_what_keeps_a_certificate() -> None:
    apps = {"web": object()}
    assert keeps(TxtVerdict("a.example", AppAddress("web")), apps) is True
    assert keeps(TxtVerdict("a.example", AppAddress("gone")), apps) is False
    assert keeps(TxtVerdict("a.example", None), apps) is False
    assert keeps(TxtVerdict("a.example", None, "timeout"), apps) is None


def test_a_name_whose_txt_look_up_failed_is_held_off() -> None:
    memory = Memory(held_off={"shop.example": NOW + 30, "old.example": NOW + 20})
    r = run(snap([request("shop.example")], certs=[cert("old.example", expires_in=DAY)]), memory)
    assert r.orders == () and r.wake_at == NOW + 20
    later = plan(snap([request("shop.example")]), ZONE, memory, NOW + 31, POLICY, verify_interval=600,
                 max_failures=5, parallel=4)
    assert [o.name for o in later.orders] == ["shop.example"]

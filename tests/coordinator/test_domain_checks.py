"""The coordinator's rules for custom domains' TXT records, as tables: what the answers say
(`coordinator.domain_txt.read_answers`, the gateway's precedence) and what a check does to a
pinned domain and its next check (`coordinator.pinned_domains.judge`, `due`)."""

from __future__ import annotations

import pytest

from coordinator.domain_txt import TxtVerdict, read_answers, resolver_address
from coordinator.pinned_domains import Plan, VerifyPolicy, due, judge
from geomesh.app_address import DSTACK_OWNER, GEOMESH_OWNER, AppAddress, Garbage
from geomesh.errors import ValidationError
from geomesh.model import Domain
from geomesh.txt_resolver import NoTxt, ResolverError, TxtRecords

HOST = "shop.example"
NODATA = NoTxt(False, 5)
NX = NoTxt(True, 5)


def txt(*values: bytes) -> TxtRecords:
    return TxtRecords(values, 300)


@pytest.mark.parametrize(("geomesh", "dstack", "app", "failure", "garbage"), [
    (txt(b"app=web"), NX, "web", False, ()),
    (txt(b"app=web:8443"), NX, "web", False, ()),
    (NX, txt(b"app-id=web"), "web", False, ()),
    (txt(b"app=web"), txt(b"app-id=other"), "web", False, ()),  # geomesh's record wins
    (NX, NX, None, False, ()),
    (NODATA, NODATA, None, False, ()),
    (txt(b"hello"), NX, None, False, (Garbage.NOT_APP_ADDRESS,)),
    (txt(b"app=web", b"app=shop"), NX, None, False, (Garbage.CONFLICT,)),
    (txt(*[b"app=web"] * 9), NX, None, False, (Garbage.TOO_MANY_RECORDS,)),
    (txt(b"app=\x00web"), NX, None, False, (Garbage.NOT_TEXT,)),
    (txt(b"garbage", b"app=web"), NX, "web", False, (Garbage.NOT_APP_ADDRESS,)),
    # geomesh's record could not be read: the seed's record does not stand in for it
    (ResolverError("timeout", "no answer"), txt(b"app-id=web"), None, True, ()),
    (NX, ResolverError("servfail", "SERVFAIL"), None, True, ()),
    (txt(b"app=web"), ResolverError("servfail", "SERVFAIL"), "web", False, ()),
])
def test_what_the_answers_name(geomesh, dstack, app, failure, garbage) -> None:
    v = read_answers(HOST, {GEOMESH_OWNER: geomesh, DSTACK_OWNER: dstack})
    assert (v.address.app if v.address else None, bool(v.failure), v.garbage) == (app, failure, garbage)
    assert v.result == ("error" if failure else "app" if app else "none")


def test_explanations_name_the_record_and_the_reason() -> None:
    assert read_answers(HOST, {GEOMESH_OWNER: NX, DSTACK_OWNER: NX}).explain() == (
        "no valid TXT record _geomesh-app-address.shop.example (nor _dstack-app-address.shop.example)")
    v = read_answers(HOST, {GEOMESH_OWNER: txt(b"app=a", b"app=b"), DSTACK_OWNER: NX})
    assert "values refused: conflict" in v.explain()
    v = read_answers(HOST, {GEOMESH_OWNER: NX, DSTACK_OWNER: txt(b"app-id=web")})
    assert v.explain() == "TXT record _dstack-app-address.shop.example names app 'web'"


@pytest.mark.parametrize(("value", "want"), [
    ("127.0.0.1:53", ("127.0.0.1", 53)), ("[::1]:5353", ("::1", 5353)),
])
def test_resolver_address(value: str, want: tuple[str, int]) -> None:
    assert resolver_address(value) == want


@pytest.mark.parametrize("value", ["127.0.0.1", "0.0.0.0:53", "resolver:53", "127.0.0.1:0", ""])
def test_a_bad_resolver_is_refused_naming_the_flag(value: str) -> None:
    with pytest.raises(ValidationError) as err:
        resolver_address(value)
    assert err.value.field == "resolver"


POLICY = VerifyPolicy(interval=600, pending=30)
NAMES_WEB = TxtVerdict(HOST, AppAddress("web"))
NAMES_SHOP = TxtVerdict(HOST, AppAddress("shop"))
NOTHING = TxtVerdict(HOST, None)
FAILED = TxtVerdict(HOST, None, "no answer from the resolver")


@pytest.mark.parametrize(("verified", "verdict", "misses", "want", "wait", "misses_after"), [
    (False, NAMES_WEB, 0, True, 600, 0),     # the record appears: verified, checked every interval
    (True, NAMES_WEB, 0, True, 600, 0),
    (True, NOTHING, 0, False, 30, 1),        # the record went: pending again
    (True, NAMES_SHOP, 0, False, 30, 1),     # it names another app: pending again
    (False, NOTHING, 1, False, 60, 2),       # pending: backoff doubles...
    (False, NOTHING, 4, False, 480, 5),
    (False, NOTHING, 5, False, 600, 6),      # ...up to the interval
    (True, FAILED, 0, True, 30, 0),          # a failed look-up changes nothing, retried soon
    (False, FAILED, 3, False, 30, 3),
])
def test_judge(verified, verdict, misses, want, wait, misses_after) -> None:
    d = Domain(HOST, "web", verified=verified)
    out = judge(d, verdict, Plan("web", 0, misses), 1000.0, POLICY)
    assert (out.verified, out.plan.due - 1000.0, out.plan.misses) == (want, wait, misses_after)
    assert out.plan.app == "web" and out.reason


def test_judge_names_the_other_app_and_the_pinned_one() -> None:
    out = judge(Domain(HOST, "web", verified=True), NAMES_SHOP, None, 0.0, POLICY)
    assert out.reason == "TXT record _geomesh-app-address.shop.example names app 'shop', not the pinned app 'web'"


def test_a_domain_pinned_to_another_app_starts_its_backoff_afresh() -> None:
    out = judge(Domain(HOST, "web"), NOTHING, Plan("shop", 0, 6), 0.0, POLICY)
    assert (out.plan.misses, out.plan.due) == (1, 30)


def test_due_new_repinned_and_expired() -> None:
    domains = {"a.example": Domain("a.example", "web"), "b.example": Domain("b.example", "web"),
               "c.example": Domain("c.example", "web"), "d.example": Domain("d.example", "shop")}
    plans = {"b.example": Plan("web", 50), "c.example": Plan("web", 150), "d.example": Plan("web", 150)}
    assert due(domains, plans, 100.0) == ["a.example", "b.example", "d.example"]


@pytest.mark.parametrize(("interval", "pending", "field"), [
    (0.5, 0.5, "domain_verify_interval"), (100000, 30, "domain_verify_interval"),
    (600, 0.1, "domain_pending_interval"), (60, 120, "domain_pending_interval"),
])
def test_policy_bounds_name_the_flag(interval: float, pending: float, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        VerifyPolicy(interval=interval, pending=pending)
    assert err.value.field == field

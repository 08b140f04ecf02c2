"""The gateway's certificate intake without a network: each bad bundle refused with its reason,
files on disk (key 0600, the chain without key material), a failed bundle keeping the one in
service, a withdrawn certificate leaving disk, saved certificates loaded at start, and the
certificate store's choice between managed and file certificates."""

from __future__ import annotations

import stat
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client import REGISTRY

from geomesh.sealing import public_bytes
from regional_gateway.certificate_intake import (
    MAX_CHAIN_BYTES,
    CertificateIntake,
    IntakeError,
    SealedBundle,
    open_bundle,
)
from regional_gateway.proxy.certificates import CertificateStore
from regional_gateway.proxy.certificates import load as load_certificate
from regional_gateway.proxy.routes import CertificateSpec
from tests.proxy.certs import TestCA

from .bundles import ThrowawayCA, bundle

ZONE = "intake.test"
GATEWAY = X25519PrivateKey.generate()
ME = public_bytes(GATEWAY)
CA = ThrowawayCA()
GOOD = CA.leaf([f"*.{ZONE}", ZONE], 0x1001)
OTHER = CA.leaf([f"*.{ZONE}", ZONE], 0x1002)


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("geomesh_gateway_certificate_intake_failures_total", {"reason": reason}) or 0.0


def test_a_good_bundle_opens() -> None:
    opened = open_bundle(SealedBundle.from_proto(bundle(ZONE, GOOD, ME)), GATEWAY, time.time())
    assert (opened.name, opened.serial, opened.dns_names) == (ZONE, 0x1001, (f"*.{ZONE}", ZONE))
    assert opened.key_pem == GOOD.key_pem and b"PRIVATE KEY" not in opened.chain_pem
    assert "PRIVATE" not in repr(opened) and GOOD.key_pem.decode() not in repr(opened)


OTHER_GATEWAY = public_bytes(X25519PrivateKey.generate())
EXPIRED = CA.leaf([ZONE], 0x1003, days=-1)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: bundle(ZONE, GOOD, OTHER_GATEWAY), "unseal"),
    (lambda: bundle(ZONE, GOOD, ME, sealed_serial="1002"), "unseal"),  # sealed for another serial
    (lambda: bundle(ZONE, GOOD, ME, key_pem=b"not a key"), "key"),
    (lambda: bundle(ZONE, GOOD, ME, key_pem=OTHER.key_pem), "key_mismatch"),
    (lambda: bundle(ZONE, GOOD, ME, names=[ZONE]), "names"),
    (lambda: bundle(ZONE, GOOD, ME, names=[f"*.{ZONE}", ZONE, "extra.example"]), "names"),
    (lambda: bundle(ZONE, GOOD, ME, serial="1002", sealed_serial="1002"), "serial"),
    (lambda: bundle(ZONE, GOOD, ME, serial="not-hex"), "serial"),
    (lambda: bundle(ZONE, EXPIRED, ME), "expired"),
    (lambda: bundle(ZONE, GOOD, ME, chain_pem="garbage"), "chain"),
    (lambda: bundle(ZONE, GOOD, ME, chain_pem=GOOD.chain_pem + GOOD.key_pem.decode()), "chain"),
    (lambda: bundle(ZONE, GOOD, ME, chain_pem=_reversed(GOOD.chain_pem)), "chain"),
    (lambda: bundle(ZONE, GOOD, ME, chain_pem=GOOD.chain_pem + " " * MAX_CHAIN_BYTES), "size"),
    (lambda: bundle("../../etc/passwd", GOOD, ME), "name"),
    (lambda: bundle("Intake.Test", GOOD, ME), "name"),
    (lambda: bundle("", GOOD, ME), "name"),
], ids=["another gateway's key", "another serial's context", "key not PEM", "key of another certificate",
        "fewer names", "more names", "serial not the leaf's", "serial not hex", "expired", "chain garbage",
        "chain with a key", "chain out of order", "chain too big", "name a path", "name not canonical", "no name"])
def test_a_bad_bundle_is_refused_with_its_reason(make, reason: str) -> None:
    with pytest.raises(IntakeError) as refused:
        open_bundle(SealedBundle.from_proto(make()), GATEWAY, time.time())
    assert refused.value.reason == reason


def _reversed(chain: str) -> str:
    end = "-----END CERTIFICATE-----\n"
    leaf, inter, _ = chain.split(end)
    return inter + end + leaf + end


def test_intake_keeps_files_private_keeps_the_previous_and_withdraws(tmp_path) -> None:
    certs = tmp_path / "certs"
    intake = CertificateIntake(GATEWAY, certs)
    (served,) = intake.apply([bundle(ZONE, GOOD, ME)])
    assert served.loaded.serial == 0x1001
    assert stat.S_IMODE((certs / f"{ZONE}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" not in (certs / f"{ZONE}.pem").read_bytes()
    assert sorted(p.name for p in certs.iterdir()) == [f"{ZONE}.key", f"{ZONE}.pem"]  # no staging left

    before = failures("unseal")
    (kept,) = intake.apply([bundle(ZONE, OTHER, OTHER_GATEWAY)])  # a new serial that does not open
    assert kept is served and failures("unseal") == before + 1
    assert load_certificate(CertificateSpec(certs / f"{ZONE}.pem", certs / f"{ZONE}.key")).serial == 0x1001

    (again,) = intake.apply([bundle(ZONE, GOOD, ME)])  # the same serial: not opened again
    assert again is served
    (renewed,) = intake.apply([bundle(ZONE, OTHER, ME)])
    assert renewed.loaded.serial == 0x1002

    assert intake.apply([]) == []  # withdrawn: out of service and off disk
    assert list(certs.iterdir()) == []


def test_saved_certificates_load_at_start_and_a_bad_pair_is_skipped(tmp_path) -> None:
    certs = tmp_path / "certs"
    other = CA.leaf(["www.shop.example"], 0x2001)
    CertificateIntake(GATEWAY, certs).apply([bundle(ZONE, GOOD, ME), bundle("shop.example", other, ME)])
    (certs / "shop.example.key").write_bytes(OTHER.key_pem)  # a pair that no longer matches
    (certs / ".staging-dead").mkdir()  # left by a crash
    before = failures("saved")
    fresh = CertificateIntake(GATEWAY, certs)
    served = fresh.load_saved()
    assert [(m.name, m.loaded.serial) for m in served] == [(ZONE, 0x1001)]
    assert failures("saved") == before + 1
    assert not (certs / ".staging-dead").exists()
    assert fresh.apply([bundle(ZONE, GOOD, ME)])[0] is served[0]  # what was loaded counts as in service


def test_store_lookup_across_file_and_managed_certificates(tmp_path) -> None:
    ca = TestCA(tmp_path)
    wild_file = load_certificate(CertificateSpec(*ca.issue("wild", [f"*.{ZONE}"])))
    api_file = load_certificate(CertificateSpec(*ca.issue("api", [f"api.{ZONE}"])))
    store = CertificateStore([wild_file, api_file])
    intake = CertificateIntake(GATEWAY, tmp_path / "certs")
    hello = CA.leaf([f"hello.{ZONE}", f"api.{ZONE}"], 0x3001)
    zone = CA.leaf([f"*.{ZONE}", ZONE], 0x3002)
    store.set_managed(intake.apply([bundle("hello.intake.test", hello, ME), bundle(ZONE, zone, ME)]))
    managed = {m.name: m.loaded for m in store.managed().values()}
    assert store.context_for(f"hello.{ZONE}") is managed["hello.intake.test"].http  # exact managed over file wildcard
    assert store.context_for(f"api.{ZONE}") is api_file.http  # the same name in both: the file wins
    assert store.context_for(f"x.{ZONE}", h2=True) is wild_file.h2  # the same wildcard in both: the file wins
    assert store.context_for(ZONE) is managed[ZONE].http  # only managed
    assert store.context_for("unknown.example") is wild_file.http  # the default: the first file certificate
    assert ("hello.intake.test", "managed", float(hello.not_after)) in store.expiries()

    only_managed = CertificateStore()
    assert only_managed.empty and only_managed.context_for("x") is None
    only_managed.set_managed(list(store.managed().values()))
    assert only_managed.context_for("unknown.example") is managed["hello.intake.test"].http  # first by name


def test_a_set_is_bounded_and_a_name_counts_once(tmp_path) -> None:
    from regional_gateway.certificate_intake import MAX_BUNDLES

    intake = CertificateIntake(GATEWAY, tmp_path / "certs")
    before = failures("duplicate")
    served = intake.apply([bundle(ZONE, GOOD, ME), bundle(ZONE, OTHER, ME)])
    assert [m.loaded.serial for m in served] == [0x1001] and failures("duplicate") == before + 1

    flood = [bundle(f"c{i}.{ZONE}", GOOD, ME) for i in range(MAX_BUNDLES + 5)]
    before = failures("too_many")
    served = intake.apply(flood)
    assert len(served) == MAX_BUNDLES and failures("too_many") == before + 5
    assert ZONE not in {m.name for m in served}  # left out of the set: withdrawn

"""The renewal schedule (pure, clock passed in) and how certificates rest and travel sealed."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from coordinator.cert_records import CertificateRecord, RenewalStatus, bundles_for, key_context, matches
from coordinator.renewal import DAY, RenewalPolicy, after_failure, after_success, due_at
from geomesh.errors import ValidationError
from geomesh.sealing import SealError, SecretBox, public_bytes, unseal

NAMES = ("geo.test", "*.geo.test")
NOW = 1_800_000_000.0


def record(not_after: float = NOW + 90 * DAY, names: tuple[str, ...] = NAMES) -> CertificateRecord:
    return CertificateRecord("geo.test", names, "chain", not_after, "0a", "c2VhbGVk")


def test_a_missing_or_renamed_certificate_is_due_now_else_renew_before_ahead_of_expiry() -> None:
    policy = RenewalPolicy()
    assert due_at(None, None, NAMES, policy) == 0
    assert due_at(record(names=("geo.test",)), None, NAMES, policy) == 0  # the names changed
    assert due_at(record(), None, tuple(reversed(NAMES)), policy) == NOW + 60 * DAY  # order does not matter
    assert due_at(record(), None, NAMES, RenewalPolicy(renew_before=10 * DAY)) == NOW + 80 * DAY


def test_failures_back_off_exponentially_up_to_the_cap_and_a_success_clears_them() -> None:
    policy = RenewalPolicy(retry_base=30, retry_max=300)
    status = None
    waits = []
    now = NOW
    for _ in range(6):
        status = after_failure("geo.test", status, now, "CA down", policy)
        waits.append(status.renew_at - now)
        assert due_at(record(), status, NAMES, policy) == status.renew_at  # the retry, not the renewal point
        now = status.renew_at
    assert waits == [30, 60, 120, 240, 300, 300]
    assert status.failures == 6 and status.last_error == "CA down"
    ok = after_success("geo.test", record(), policy)
    assert ok.failures == 0 and ok.last_error == "" and ok.renew_at == NOW + 60 * DAY
    assert len(after_failure("geo.test", None, NOW, "x" * 5000, policy).last_error) == 500


@pytest.mark.parametrize(("kwargs", "field"), [(dict(renew_before=-1), "renew_before"),
                                               (dict(retry_base=0), "retry_base"),
                                               (dict(retry_base=10, retry_max=5), "retry_base")])
def test_a_bad_policy_is_refused_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        RenewalPolicy(**kwargs)
    assert info.value.field == field


def self_signed(names: tuple[str, ...]) -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(0x0A).not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def test_a_stored_key_rests_sealed_and_reaches_each_gateway_sealed_to_it_alone(tmp_path) -> None:
    chain, key_pem = self_signed(NAMES)
    box = SecretBox.load_or_create(tmp_path / "secrets.key")
    rec = CertificateRecord("geo.test", NAMES, chain, NOW, "0a",
                            base64.b64encode(box.seal(key_pem, key_context("geo.test", "0a"))).decode())
    assert key_pem not in rec.to_json() and b"PRIVATE KEY" not in rec.to_json()
    assert CertificateRecord.from_json(rec.to_json()) == rec
    assert rec.open_key(box) == key_pem and matches(chain, key_pem)
    gw_a, gw_b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    bundles, failed = bundles_for([rec], base64.b64encode(public_bytes(gw_a)).decode(), box)
    assert failed == [] and len(bundles) == 1
    b = bundles[0]
    assert (b.name, list(b.dns_names), b.serial, b.chain_pem) == ("geo.test", list(NAMES), "0a", chain)
    assert b"PRIVATE KEY" not in b.SerializeToString()
    assert unseal(gw_a, b.sealed_key, key_context("geo.test", "0a")) == key_pem
    with pytest.raises(SealError):
        unseal(gw_b, b.sealed_key, key_context("geo.test", "0a"))
    # a replica with another secrets key cannot open it: reported, not sent, no crash
    other = SecretBox.load_or_create(tmp_path / "other.key")
    assert bundles_for([rec], base64.b64encode(public_bytes(gw_a)).decode(), other) == ([], ["geo.test"])


def test_status_records_round_trip_and_show_in_the_overview_message() -> None:
    status = RenewalStatus("geo.test", NOW + 30, failures=2, last_error="CA down")
    assert RenewalStatus.from_json(status.to_json()) == status
    shown = record().status(status)
    assert (shown.name, shown.failures, shown.last_error, shown.renew_at) == ("geo.test", 2, "CA down", int(NOW + 30))

"""coordinator.acme_client's pure side as tables: names, keys, CSRs, chains and constructor
arguments; each bad input is one AcmeError naming the field, before any network traffic."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from coordinator.acme_client import (
    AcmeClient,
    AcmeError,
    Issued,
    check_names,
    csr_pem,
    issued_from_chain,
    new_key_pem,
)
from geomesh.lab.pebble import free_port


def pem(key: object, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("names", "expected"), [
    (("geo.test",), ("geo.test",)),
    (("GEO.Test.", "*.geo.test"), ("geo.test", "*.geo.test")),
    (["*.geo.test", "geo.test"], ("*.geo.test", "geo.test")),   # the caller's order is kept
])
def test_names_normalised(names, expected) -> None:
    assert check_names(names) == expected


@pytest.mark.parametrize(("names", "message"), [
    ((), "names: at least one domain name is needed"),
    ("geo.test", "names: a sequence of domain names is needed, not a single str"),
    (("geo.test", "GEO.test."), "names[1]: 'geo.test' is listed twice"),
    (("geo.test", ""), "names[1]: is required"),
    (("*.*.geo.test",), "names[0]: '*.geo.test' is not a valid domain name"),
    (("geo..test",), "names[0]: 'geo..test' is not a valid domain name"),
    (("geo.test/x",), "names[0]: 'geo.test/x' is not a valid domain name"),
    (("x" * 300,), "names[0]: is longer than 253 characters"),
    (("test",), "names[0]: 'test' is not a valid domain name"),
    (("geo.test", 7), "names[1]: a string is needed, not int"),
    (tuple(f"n{i}.geo.test" for i in range(101)), "names: 101 names, at most 100 fit in one certificate"),
])
def test_bad_names(names, message) -> None:
    with pytest.raises(AcmeError) as err:
        csr_pem(new_key_pem(), names)
    assert str(err.value) == message


def test_csr_asks_for_the_names_in_order_with_the_key() -> None:
    key_pem = new_key_pem()
    csr = x509.load_pem_x509_csr(csr_pem(key_pem, ("geo.test", "*.geo.test")))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["geo.test", "*.geo.test"]
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


@pytest.mark.parametrize(("key_pem", "message"), [
    (b"junk", "key_pem: not an unencrypted PEM private key"),
    ("-----BEGIN PRIVATE KEY-----", "key_pem: PEM bytes expected, not str"),
    (pem(ec.generate_private_key(ec.SECP256R1()), b"secret"), "key_pem: not an unencrypted PEM private key"),
    (pem(ed25519.Ed25519PrivateKey.generate()), "key_pem: an EC P-256/P-384 or RSA >= 2048 key is needed"),
    (pem(ec.generate_private_key(ec.SECP521R1())), "key_pem: an EC P-256/P-384 or RSA >= 2048 key is needed"),
    (pem(rsa.generate_private_key(65537, 1024)), "key_pem: an EC P-256/P-384 or RSA >= 2048 key is needed"),
    (b"x" * 300_000, "key_pem: 300000 bytes is too large for a private key"),
])
def test_bad_certificate_keys(key_pem, message) -> None:
    with pytest.raises(AcmeError) as err:
        csr_pem(key_pem, ("geo.test",))
    assert str(err.value).startswith(message)


def test_rsa_and_p384_keys_make_csrs() -> None:
    for key in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())):
        assert x509.load_pem_x509_csr(csr_pem(pem(key), ("geo.test",))).is_signature_valid


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"directory": "ftp://ca.test/dir"}, "directory: 'ftp://ca.test/dir' is not an http(s) URL"),
    ({"directory": "https:///dir"}, "directory: 'https:///dir' is not an http(s) URL"),
    ({"timeout": 0}, "timeout: 0 is not a number of seconds in (0, 300]"),
    ({"timeout": float("nan")}, "timeout: nan is not a number of seconds in (0, 300]"),
    ({"email": "nobody"}, "email: 'nobody' is not an e-mail address"),
    ({"ca_bundle": Path("no-such-bundle.pem")}, "ca_bundle: no-such-bundle.pem is not a file"),
    ({"account_key_pem": b"junk"}, "account_key_pem: not an unencrypted PEM private key"),
    ({"account_key_pem": pem(ed25519.Ed25519PrivateKey.generate())}, "account_key_pem: an EC P-256/P-384"),
])
def test_bad_client_arguments(kwargs, message) -> None:
    args = {"directory": "https://127.0.0.1:14000/dir", "account_key_pem": new_key_pem(), **kwargs}
    directory = args.pop("directory")
    with pytest.raises(AcmeError) as err:
        AcmeClient(directory, **args)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("deadline", "names", "message"), [
    (0, ("geo.test",), "deadline: 0 is not a positive number of seconds"),
    (float("inf"), ("geo.test",), "deadline: inf is not a positive number of seconds"),
    (30, ("geo..test",), "names[0]: 'geo..test' is not a valid domain name"),
])
async def test_bad_order_arguments_fail_before_the_ca_is_asked(deadline, names, message) -> None:
    called: list[object] = []

    async def callback(records: object) -> None:
        called.append(records)

    client = AcmeClient(f"https://127.0.0.1:{free_port()}/dir", account_key_pem=new_key_pem())
    with pytest.raises(AcmeError) as err:
        await client.order_dns01(names, new_key_pem(), callback, callback, deadline=deadline)
    assert str(err.value) == message  # not "connection refused": nothing was sent
    assert called == []


# -- chains --------------------------------------------------------------------------------------

def _cert(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
          sans: tuple[str, ...] = (), serial: int = 0xABC123) -> x509.Certificate:
    now = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
         .public_key(key.public_key()).serial_number(serial)
         .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=90)))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def test_chain_parsed() -> None:
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("geo.test", "CA", leaf_key, ca_key, ("geo.test", "*.geo.test"))
    inter = _cert("CA", "Root", ca_key, ca_key)
    issued = issued_from_chain("junk before\n" + _pem(leaf, inter))
    start = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()
    assert issued == Issued(_pem(leaf, inter), ("geo.test", "*.geo.test"), start, start + 90 * 86400, "abc123")


@pytest.mark.parametrize(("make", "message"), [
    (lambda leaf, inter, bare: "", "chain_pem: no PEM certificate in it"),
    (lambda leaf, inter, bare: b"bytes", "chain_pem: PEM text expected, not bytes"),
    (lambda leaf, inter, bare: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "chain_pem: not a PEM certificate chain"),
    (lambda leaf, inter, bare: _pem(inter, leaf), "chain_pem: certificate 1 did not issue certificate 0"),
    (lambda leaf, inter, bare: _pem(bare, inter), "chain_pem: the leaf has no subjectAltName"),
    (lambda leaf, inter, bare: _pem(leaf) * 2000, "chain_pem: "),
])
def test_bad_chains(make, message) -> None:
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("geo.test", "CA", leaf_key, ca_key, ("geo.test",))
    bare = _cert("geo.test", "CA", leaf_key, ca_key)
    inter = _cert("CA", "Root", ca_key, ca_key)
    with pytest.raises(AcmeError) as err:
        issued_from_chain(make(leaf, inter, bare))
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("names", (), "names: a certificate names at least one DNS name"),
    ("serial", "ABC", "serial: 'ABC' is not lower-case hex"),
    ("serial", "0x1", "serial: '0x1' is not lower-case hex"),
    ("not_after", 1.0, "not_after: 1.0 is before not_before 2.0"),
    ("chain_pem", "", "chain_pem: no PEM certificate in it"),
])
def test_issued_checks_itself(field, value, message) -> None:
    fields = {"chain_pem": "-----BEGIN CERTIFICATE-----", "names": ("geo.test",), "not_before": 2.0,
              "not_after": 3.0, "serial": "ab", field: value}
    with pytest.raises(AcmeError) as err:
        Issued(**fields)
    assert str(err.value) == message

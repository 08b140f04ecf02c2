"""Sealed key material: only the right key and context open it, files are 0600."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from geomesh.sealing import SealError, SecretBox, load_or_create_sealing_key, public_bytes, seal, unseal

KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n"


def test_a_sealed_key_opens_only_for_its_recipient_and_context() -> None:
    gw, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    blob = seal(public_bytes(gw), KEY_PEM, b"cert:zone:01")
    assert KEY_PEM not in blob
    assert unseal(gw, blob, b"cert:zone:01") == KEY_PEM
    with pytest.raises(SealError):
        unseal(other, blob, b"cert:zone:01")  # another gateway
    with pytest.raises(SealError):
        unseal(gw, blob, b"cert:zone:02")  # another serial
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(SealError):
        unseal(gw, bytes(damaged), b"cert:zone:01")
    with pytest.raises(SealError):
        unseal(gw, b"GMS1short", b"cert:zone:01")
    with pytest.raises(SealError):
        seal(b"\x00" * 31, KEY_PEM, b"x")
    assert seal(public_bytes(gw), KEY_PEM, b"c") != seal(public_bytes(gw), KEY_PEM, b"c")  # fresh each time


def test_a_low_order_ephemeral_key_is_refused_not_a_crash() -> None:
    gw = X25519PrivateKey.generate()
    blob = b"GMS1" + b"\x00" * 32 + b"\x00" * 12 + b"\x00" * 40
    with pytest.raises(SealError):
        unseal(gw, blob, b"c")


def test_the_sealing_key_file_is_made_once_with_mode_0600(tmp_path) -> None:
    path = tmp_path / "state" / "sealing.key"
    key = load_or_create_sealing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_bytes(load_or_create_sealing_key(path)) == public_bytes(key)  # kept, not remade
    (tmp_path / "ed.key").write_bytes(b"garbage")
    with pytest.raises(ValueError):
        load_or_create_sealing_key(tmp_path / "ed.key")


def test_the_secret_box_opens_with_the_shared_key_only(tmp_path) -> None:
    path = tmp_path / "secrets.key"
    box = SecretBox.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    blob = box.seal(KEY_PEM, b"account")
    assert KEY_PEM not in blob
    assert SecretBox.load_or_create(path).unseal(blob, b"account") == KEY_PEM  # another replica
    with pytest.raises(SealError):
        box.unseal(blob, b"cert")
    with pytest.raises(SealError):
        SecretBox(b"\x01" * 32).unseal(blob, b"account")
    with pytest.raises(SealError):
        SecretBox(b"short")

"""WireGuard key handling: 0600 file created atomically, reload gives the same key, secrets hidden."""

from __future__ import annotations

import base64
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from geomesh.errors import ValidationError
from regional_gateway.wireguard import keys
from regional_gateway.wireguard.keys import KeyFileError, PrivateKey, load_or_create


def test_created_file_is_0600_and_reload_gives_same_key(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wg.key"
    first = load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_or_create(path)
    assert again == first
    assert again.public_key == first.public_key
    assert again.secret_base64() == first.secret_base64()
    # no temporary file left next to it
    assert sorted(p.name for p in path.parent.iterdir()) == ["wg.key"]


def test_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_file_is_never_world_readable_while_being_created(tmp_path: Path) -> None:
    # a watcher polls the directory during many creations and records every mode it sees
    script = textwrap.dedent(f"""
        import os, stat, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from regional_gateway.wireguard.keys import load_or_create
        d = Path({str(tmp_path)!r})
        for i in range(200):
            load_or_create(d / f"k{{i}}")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    seen = set()
    while proc.poll() is None:
        for entry in os.scandir(tmp_path):
            try:
                seen.add(stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
            except FileNotFoundError:
                pass
    assert proc.wait() == 0
    for entry in os.scandir(tmp_path):
        seen.add(stat.S_IMODE(entry.stat().st_mode))
    assert seen == {0o600}


def test_file_format_is_wg_base64_and_matches_cryptography(tmp_path: Path) -> None:
    key = load_or_create(tmp_path / "k")
    text = (tmp_path / "k").read_text()
    assert text.endswith("\n") and len(text.strip()) == 44
    raw = base64.b64decode(text.strip())
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    assert base64.b64encode(pub).decode() == key.public_key
    # clamped like `wg genkey`
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


def test_repr_str_and_pickle_hide_the_secret(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    secret_b64, secret_hex = key.secret_base64(), key.secret_hex()
    for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert secret_b64 not in text and secret_hex not in text
        assert key.public_key in text
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_group_readable_file_is_refused_with_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "k"
    load_or_create(path)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create(path)


def test_malformed_file_error_does_not_echo_content(tmp_path: Path) -> None:
    path = tmp_path / "k"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"SECRETSECRET-not-base64\n")
    os.close(fd)
    with pytest.raises(KeyFileError) as info:
        keys.load(path)
    assert "SECRETSECRET" not in str(info.value)
    assert "does not hold one base64 WireGuard private key" in str(info.value)


def test_missing_file_for_load_is_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open"):
        keys.load(tmp_path / "absent")


def test_hex_and_base64_round_trip() -> None:
    key = PrivateKey.generate()
    assert keys.from_hex(keys.to_hex(key.public_key)) == key.public_key
    assert PrivateKey.from_base64(key.secret_base64()) == key
    with pytest.raises(ValidationError, match="32 bytes"):
        keys.decode_key("public_key", base64.b64encode(b"x" * 31).decode())
    with pytest.raises(ValidationError, match="base64"):
        keys.decode_key("public_key", "!!!")

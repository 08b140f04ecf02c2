"""WireGuard X25519 keys: generation, the 0600 key file, and the base64/hex forms.

A gateway's private key is generated on the gateway (`cryptography`'s X25519), clamped like
`wg genkey` output, and kept in a file that is created atomically with mode 0600 — it is
never world- or group-readable, not even for an instant — and loaded again on restart, so the
gateway keeps its identity. `PrivateKey` hides its secret from `repr`/`str` (only the public
key shows), so a key that ends up in a log line or a traceback leaks nothing. Keys travel in
the base64 form `wg` uses; the wireguard-go UAPI wants lowercase hex (`to_hex`/`from_hex`).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from geomesh.errors import GeomeshError, ValidationError

KEY_LEN = 32


class KeyFileError(GeomeshError):
    """The key file cannot be used: unsafe mode, unreadable, or not one base64 WireGuard key."""


def decode_key(field: str, value: str) -> bytes:
    """The 32 raw bytes of a base64 WireGuard key, or ValidationError naming `field`."""
    if not isinstance(value, str):
        raise ValidationError(field, f"expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(field, "not valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValidationError(field, f"a WireGuard key is {KEY_LEN} bytes, this one is {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    """The base64 form (44 characters) of 32 raw key bytes."""
    if len(raw) != KEY_LEN:
        raise ValidationError("key", f"a WireGuard key is {KEY_LEN} bytes, this one is {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def canonical_key(field: str, value: str) -> str:
    """`value` re-encoded in canonical base64 (validates it)."""
    return encode_key(decode_key(field, value))


def to_hex(b64_key: str) -> str:
    """base64 key -> the lowercase hex form of the wireguard-go UAPI."""
    return decode_key("key", b64_key).hex()


def from_hex(hex_key: str) -> str:
    """UAPI hex key -> base64."""
    try:
        raw = bytes.fromhex(hex_key)
    except ValueError:
        raise ValidationError("key", "not valid hex") from None
    return encode_key(raw)


def _clamp(raw: bytes) -> bytes:
    """Curve25519 scalar clamping (what `wg genkey` and every WireGuard implementation apply)."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


class PrivateKey:
    """An X25519 private key whose secret never shows in repr/str/logs."""

    __slots__ = ("_raw", "_public")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise ValidationError("private_key", f"a WireGuard key is {KEY_LEN} bytes, this one is {len(raw)}")
        self._raw = _clamp(raw)
        pub = X25519PrivateKey.from_private_bytes(self._raw).public_key().public_bytes_raw()
        self._public = encode_key(pub)

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_base64(cls, value: str) -> PrivateKey:
        return cls(decode_key("private_key", value))

    @property
    def public_key(self) -> str:
        """The public key, base64 (safe to log and to send)."""
        return self._public

    def secret_base64(self) -> str:
        """The private key in base64 — only for handing it to the local WireGuard device."""
        return encode_key(self._raw)

    def secret_hex(self) -> str:
        """The private key in UAPI hex — only for handing it to the local wireguard-go."""
        return self._raw.hex()

    def __repr__(self) -> str:
        return f"PrivateKey(public_key={self._public!r}, secret=<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return self._public == other._public

    def __hash__(self) -> int:
        return hash(self._public)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("PrivateKey is not picklable: the private key never leaves the host")


def _check_mode(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group/others read the private key; "
            "run `chmod 600` on it (or delete it to generate a new key)"
        )


def load(path: Path) -> PrivateKey:
    """Load the key in `path`; KeyFileError if it is group/world-accessible or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot open key file: {e.strerror}") from None
    try:
        _check_mode(path, os.fstat(fd))
        data = os.read(fd, 256)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii").strip()
        return PrivateKey.from_base64(text)
    except (UnicodeDecodeError, ValidationError):
        # never echo the content: it is (or was meant to be) a secret
        raise KeyFileError(f"{path}: does not hold one base64 WireGuard private key") from None


def load_or_create(path: Path) -> PrivateKey:
    """The key stored in `path`, generated and stored first if the file does not exist.

    The file is written under a temporary name opened with O_CREAT|O_EXCL and mode 0600, synced,
    then hard-linked into place, so readers see either no file or the whole key, never a partial
    one, and two processes racing to create it end up with the same key.
    """
    path = Path(path)
    if path.exists():
        return load(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = PrivateKey.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the umask (umask can only have removed bits)
        os.write(fd, (key.secret_base64() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if someone else created the file meanwhile
    except FileExistsError:
        return load(path)
    finally:
        os.unlink(tmp)
    return key

"""Private keys that travel or rest only sealed (docs/certificates.md, "Keys").

Two boxes, both authenticated encryption with a `context` bound in (a blob sealed for one
certificate, serial or gateway does not open as another):

- `seal` / `unseal`: to a recipient's X25519 key. A fresh ephemeral X25519 key per message; the
  shared secret goes through HKDF-SHA256 (salt: both public keys, info: a label and the context)
  into a ChaCha20-Poly1305 key. Only the holder of the private key opens it: the coordinator
  seals a certificate's key to each gateway's sealing key, the gateway opens it in memory.
- `SecretBox`: a 32-byte key the coordinator replicas share (`<pki-dir>/secrets.key`, mode 0600),
  for what must rest in etcd (the ACME account key, the certificates' keys, so that any replica can
  renew and seal them to a gateway that joins later). ChaCha20-Poly1305 with a random nonce.

Blob layouts (versioned by a 4-byte magic): seal = "GMS1" | ephemeral public (32) | nonce (12) |
ciphertext+tag; secret box = "GMB1" | nonce (12) | ciphertext+tag.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEAL_MAGIC = b"GMS1"
BOX_MAGIC = b"GMB1"
_LABEL = b"geomesh seal v1 "
_NONCE = 12
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SealError(ValueError):
    """A blob that does not open: wrong key, wrong context, damaged or not a blob at all."""


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of `key`'s public half (what a gateway registers)."""
    return key.public_key().public_bytes(*_RAW)


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=_LABEL + context).derive(shared)


def seal(recipient_public: bytes, plaintext: bytes, context: bytes) -> bytes:
    """`plaintext` sealed so that only the holder of `recipient_public`'s private key opens it."""
    if len(recipient_public) != 32:
        raise SealError(f"a sealing public key is 32 bytes, not {len(recipient_public)}")
    eph = X25519PrivateKey.generate()
    eph_pub = public_bytes(eph)
    key = _derive(eph.exchange(X25519PublicKey.from_public_bytes(recipient_public)), eph_pub,
                  recipient_public, context)
    nonce = os.urandom(_NONCE)
    return SEAL_MAGIC + eph_pub + nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context)


def unseal(private: X25519PrivateKey, blob: bytes, context: bytes) -> bytes:
    """Open a `seal` blob with the recipient's private key (SealError if it does not open)."""
    if len(blob) < 4 + 32 + _NONCE + 16 or not blob.startswith(SEAL_MAGIC):
        raise SealError("not a sealed blob")
    eph_pub, nonce, body = blob[4:36], blob[36:36 + _NONCE], blob[36 + _NONCE:]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError as exc:  # an all-zero shared secret (a low-order point)
        raise SealError(f"bad ephemeral key: {exc}") from None
    key = _derive(shared, eph_pub, public_bytes(private), context)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, context)
    except InvalidTag:
        raise SealError("the blob does not open with this key and context") from None


def write_private_file(path: Path, data: bytes) -> None:
    """Write key material to `path`: mode 0600 from creation, replaced atomically (a temporary
    file renamed), synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_sealing_key(path: Path) -> X25519PrivateKey:
    """The X25519 key in `path` (PKCS#8 PEM), made (mode 0600) when the file does not exist."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        key = X25519PrivateKey.generate()
        write_private_file(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return key
    loaded = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(loaded, X25519PrivateKey):
        raise SealError(f"{path} holds a {type(loaded).__name__}, not an X25519 key")
    return loaded


class SecretBox:
    """Symmetric sealing under a 32-byte key shared by the coordinator replicas."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise SealError(f"a secrets key is 32 bytes, not {len(key)}")
        self._aead = ChaCha20Poly1305(key)

    @classmethod
    def load_or_create(cls, path: Path) -> SecretBox:
        """The key in `path` (32 raw bytes), made (mode 0600) when the file does not exist."""
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = os.urandom(32)
            write_private_file(path, key)
        return cls(key)

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return BOX_MAGIC + nonce + self._aead.encrypt(nonce, plaintext, context)

    def unseal(self, blob: bytes, context: bytes) -> bytes:
        if len(blob) < 4 + _NONCE + 16 or not blob.startswith(BOX_MAGIC):
            raise SealError("not a secret-box blob")
        try:
            return self._aead.decrypt(blob[4:4 + _NONCE], blob[4 + _NONCE:], context)
        except InvalidTag:
            raise SealError("the blob does not open with this key and context") from None

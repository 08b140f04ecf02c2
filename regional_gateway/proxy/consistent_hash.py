"""Consistent hashing of client addresses onto backends: a hash ring with virtual nodes.

Each backend key ("addr:port") owns `POINTS` positions on a 64-bit ring (blake2b of
"key#i"); a client address hashes to a position and belongs to the first backend point at or
after it. Adding or removing one of N backends therefore moves only the clients of the points it
gains or loses, about 1/N of them, and every other client stays where it was. Unavailable
backends are skipped by walking clockwise, so health changes need no rebuild and clients of
healthy backends never move. Pure: no I/O, deterministic across processes.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
POINTS = 256  # points per backend; fixed, so a backend's points never depend on who else is there


_CLIENT_HASHES: dict[bytes, int] = {}  # client address -> hash64, bounded (a client sends many requests)
_CLIENT_HASHES_MAX = 65536


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def client_hash(client: bytes) -> int:
    h = _CLIENT_HASHES.get(client)
    if h is None:
        if len(_CLIENT_HASHES) >= _CLIENT_HASHES_MAX:
            _CLIENT_HASHES.clear()
        h = _CLIENT_HASHES[client] = hash64(client)
    return h


class HashRing(Generic[T]):
    """A ring over `items`, each identified by `key_of(item)` (stable across versions)."""

    __slots__ = ("_hashes", "_owners", "_primary", "items")

    def __init__(self, items: Sequence[T], key_of: Callable[[T], str]) -> None:
        self.items = tuple(items)
        points = POINTS
        ring: list[tuple[int, int]] = []
        for idx, item in enumerate(self.items):
            key = key_of(item).encode()
            ring.extend((hash64(key + b"#%d" % i), idx) for i in range(points))
        ring.sort()
        self._hashes = [h for h, _ in ring]
        self._owners = [idx for _, idx in ring]
        self._primary: dict[bytes, int] = {}  # client -> ring position of its own point (memo, bounded)

    def _position(self, client: bytes) -> int:
        i = self._primary.get(client)
        if i is None:
            i = bisect_left(self._hashes, client_hash(client))
            if i == len(self._hashes):
                i = 0
            if len(self._primary) >= _CLIENT_HASHES_MAX:
                self._primary.clear()
            self._primary[client] = i
        return i

    def primary(self, client: bytes) -> T | None:
        """The owner of `client`'s own point, whether available or not."""
        if not self._hashes:
            return None
        return self.items[self._owners[self._position(client)]]

    def lookup(self, client: bytes, available: Callable[[T], bool] | None = None) -> T | None:
        """The backend for `client`, skipping items for which `available` is false."""
        if not self._hashes:
            return None
        i = self._position(client)
        item = self.items[self._owners[i]]
        if available is None or available(item):
            return item
        size = len(self._hashes)
        tried = {self._owners[i]}
        for step in range(1, size):
            idx = self._owners[(i + step) % size]
            if idx in tried:
                continue
            item = self.items[idx]
            if available(item):
                return item
            tried.add(idx)
            if len(tried) == len(self.items):
                break
        return None

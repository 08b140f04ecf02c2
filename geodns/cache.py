"""A cache bounded by bytes and entries that evicts in two generations, never all at once.

`BoundedCache` holds the entries of the current generation in `current` (a plain dict, so a
transport may read it with `current.get` at the price of a dict look-up) and the entries of the
previous generation in `previous`. A new entry, and an entry found in `previous` (`get` promotes
it), goes into `current`. When `current` would pass half the byte budget or half the entry limit,
it becomes `previous` and the old `previous` is dropped (its entries count as evictions). Each
generation holds at most half the budget, so the cache never holds more than `max_bytes`
accounted bytes or `max_entries` entries (rounded up to an even number), and an entry asked at least once per generation is
never evicted: a flood of one-off keys turns generations over but does not flush what others keep
asking for (a segmented LRU in its cheapest form, with nothing to do on a hit in `current`).

Sizes are accounted, not measured: the caller passes `sizeof(key, value)`, the octets the entry
holds plus an estimate of Python's per-object overhead. An entry larger than a generation is not
kept. `reset()` empties the cache without counting evictions (the data it answered from changed);
`retain(keep)` drops (or replaces) only the entries that changed.
No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A key -> value cache of at most `max_bytes` (accounted) and `max_entries` entries."""

    __slots__ = ("max_bytes", "max_entries", "current", "previous", "evictions", "refused",
                 "_sizeof", "_gen_bytes", "_gen_entries", "_cur_bytes", "_prev_bytes")

    def __init__(self, max_bytes: int, max_entries: int, sizeof: Callable[[K, V], int]) -> None:
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("cache limits must be >= 0")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._sizeof = sizeof
        self._gen_bytes = max_bytes // 2
        self._gen_entries = max(1, max_entries // 2) if max_entries else 0
        self.current: dict[K, V] = {}
        self.previous: dict[K, V] = {}
        self._cur_bytes = 0
        self._prev_bytes = 0
        self.evictions = 0  # entries dropped to stay within the bounds
        self.refused = 0  # entries not kept: larger than a generation

    # -- reading -------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._gen_bytes > 0 and self._gen_entries > 0

    @property
    def bytes(self) -> int:
        """Accounted size of every entry held."""
        return self._cur_bytes + self._prev_bytes

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def __contains__(self, key: object) -> bool:
        return key in self.current or key in self.previous

    def __getitem__(self, key: K) -> V:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: K) -> V | None:
        """The value of `key`, promoted to the current generation when it was in the previous one."""
        value = self.current.get(key)
        if value is not None:
            return value
        value = self.previous.pop(key, None)  # type: ignore[arg-type]
        if value is not None:
            size = self._sizeof(key, value)
            self._prev_bytes -= size
            self._insert(key, value, size)
        return value

    # -- writing -------------------------------------------------------------------------------

    def put(self, key: K, value: V) -> bool:
        """Keep `value` under `key`; False when it is larger than a generation (not kept)."""
        if not self.enabled:
            return False
        size = self._sizeof(key, value)
        if size > self._gen_bytes:
            self.refused += 1
            return False
        old = self.current.pop(key, None)  # type: ignore[arg-type]
        if old is not None:
            self._cur_bytes -= self._sizeof(key, old)
        else:
            old = self.previous.pop(key, None)  # type: ignore[arg-type]
            if old is not None:
                self._prev_bytes -= self._sizeof(key, old)
        self._insert(key, value, size)
        return True

    def _insert(self, key: K, value: V, size: int) -> None:
        if self._cur_bytes + size > self._gen_bytes or len(self.current) >= self._gen_entries:
            self.evictions += len(self.previous)
            self.previous = self.current
            self._prev_bytes = self._cur_bytes
            self.current = {}
            self._cur_bytes = 0
        self.current[key] = value
        self._cur_bytes += size

    def retain(self, keep: Callable[[K, V], V | None]) -> int:
        """Keep only what `keep(key, value)` returns for each entry (None: drop it; a value:
        hold that instead), each in its generation; the sizes are accounted anew. Returns how
        many entries were dropped (not counted as evictions: what they held is no longer true)."""
        dropped = 0
        sizes = []
        for gen in (self.current, self.previous):
            kept: dict[K, V] = {}
            size = 0
            for key, value in gen.items():
                new = keep(key, value)
                if new is None:
                    dropped += 1
                    continue
                kept[key] = new
                size += self._sizeof(key, new)
            sizes.append((kept, size))
        (self.current, self._cur_bytes), (self.previous, self._prev_bytes) = sizes
        return dropped

    def reset(self) -> None:
        """Empty both generations (not counted as evictions)."""
        self.current = {}
        self.previous = {}
        self._cur_bytes = 0
        self._prev_bytes = 0

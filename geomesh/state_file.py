"""Persisted last-known state: the file a gateway or a DNS server serves from after a restart
while etcd and the coordinator are away (static stability, docs/static-stability.md).

A state file is one JSON header line, then the payload bytes (protobuf, opaque here)::

    {"format": 1, "kind": "gateway", "owner": "gw-eu-1", "revision": 812, "written_at": 1.8e9,
     "length": 5120, "sha256": "<hex of the payload>"}\\n<payload>

`encode` and `decode` are pure: `decode` checks the header, the length and the checksum, and
that the file is of the kind and owner the caller expects (a gateway never serves another
gateway's table, a DNS server never another zone's view), and raises one `StateFileError`
subclass per condition (`Corrupt`, `Truncated`, `NewerFormat`, `Foreign`, `TooOld`), each
naming what is wrong. The I/O is two small functions: `write_atomic` (temp file in the same
directory, fsync, rename, fsync the directory: a crash leaves the old file or the new one, never
half of one) and `load`, which logs a refused file with a clear line, counts it in
`geomesh_state_file_refused_total{kind,reason}` and returns None, so the process starts as if it
had no saved state and never crashes on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from geomesh.logs import event

log = logging.getLogger("geomesh.state_file")

FORMAT = 1            # the version this code writes and the newest it reads
MAX_HEADER = 4096     # bytes: a longer first line is not one of our headers
MAX_PAYLOAD = 256 << 20  # a payload announced larger than this is refused before it is read

REFUSED = Counter("geomesh_state_file_refused_total", "saved state files refused at start",
                  ["kind", "reason"])  # reason: corrupt | truncated | newer_format | foreign | too_old | unreadable
WRITES = Counter("geomesh_state_file_writes_total", "saved state files written", ["kind", "result"])


class StateFileError(Exception):
    """The file cannot be served from; `reason` is the metric label, the message says why."""

    reason = "corrupt"


class Corrupt(StateFileError):
    reason = "corrupt"


class Truncated(StateFileError):
    reason = "truncated"


class NewerFormat(StateFileError):
    reason = "newer_format"


class Foreign(StateFileError):
    reason = "foreign"


class TooOld(StateFileError):
    reason = "too_old"


@dataclass(frozen=True, slots=True)
class Saved:
    """One saved state: whose it is, at which etcd revision, when it was written, the payload."""

    kind: str
    owner: str
    revision: int
    written_at: float
    payload: bytes

    def __post_init__(self) -> None:
        if not self.kind or not self.owner:
            raise ValueError("kind and owner must be set")
        if self.revision < 0:
            raise ValueError("revision must be >= 0")

    def age(self, now: float) -> float:
        return max(0.0, now - self.written_at)


def encode(saved: Saved) -> bytes:
    header = {"format": FORMAT, "kind": saved.kind, "owner": saved.owner, "revision": saved.revision,
              "written_at": saved.written_at, "length": len(saved.payload),
              "sha256": hashlib.sha256(saved.payload).hexdigest()}
    return json.dumps(header, sort_keys=True).encode() + b"\n" + saved.payload


def decode(data: bytes, *, kind: str, owner: str, max_age: float = 0.0, now: float | None = None) -> Saved:
    """The saved state in `data`, if it is whole, ours and (with `max_age` > 0) young enough."""
    head, sep, payload = data.partition(b"\n")
    if not sep:
        if len(data) < MAX_HEADER and data.startswith(b"{"):
            raise Truncated(f"the header line ends after {len(data)} bytes")
        raise Corrupt("no header line")
    if len(head) > MAX_HEADER:
        raise Corrupt(f"header line longer than {MAX_HEADER} bytes")
    try:
        header = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Corrupt(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise Corrupt("header is not a JSON object")
    fmt = header.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise Corrupt(f"format {fmt!r} is not a positive integer")
    if fmt > FORMAT:
        raise NewerFormat(f"format {fmt} is newer than {FORMAT}, the newest this version reads")
    fields = {"kind": str, "owner": str, "revision": int, "written_at": (int, float), "length": int, "sha256": str}
    for name, want in fields.items():
        value = header.get(name)
        if not isinstance(value, want) or isinstance(value, bool):
            raise Corrupt(f"header field {name!r} is missing or not a {getattr(want, '__name__', 'number')}")
    if header["kind"] != kind or header["owner"] != owner:
        raise Foreign(f"written for {header['kind']} {header['owner']!r}, this is {kind} {owner!r}")
    length = header["length"]
    if not 0 <= length <= MAX_PAYLOAD:
        raise Corrupt(f"length {length} is outside 0..{MAX_PAYLOAD}")
    if len(payload) < length:
        raise Truncated(f"payload has {len(payload)} of {length} bytes")
    if len(payload) > length:
        raise Corrupt(f"{len(payload) - length} bytes after the payload")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise Corrupt("payload checksum (sha256) does not match")
    if header["revision"] < 0:
        raise Corrupt(f"revision {header['revision']} is negative")
    saved = Saved(kind, owner, header["revision"], float(header["written_at"]), payload)
    if max_age > 0:
        age = saved.age(time.time() if now is None else now)
        if age > max_age:
            raise TooOld(f"written {age:.0f} s ago, more than the maximum age of {max_age:g} s")
    return saved


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: temp file beside it, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: Path, saved: Saved) -> bool:
    """Write `saved` atomically; log and count a failure (the process keeps serving)."""
    try:
        write_atomic(path, encode(saved))
    except OSError as exc:
        WRITES.labels(saved.kind, "failed").inc()
        event(log, "state file not written", logging.ERROR, path=str(path), kind=saved.kind, error=str(exc))
        return False
    WRITES.labels(saved.kind, "ok").inc()
    return True


def load(path: Path, *, kind: str, owner: str, max_age: float = 0.0) -> Saved | None:
    """The saved state at `path`, or None (no file, or a refused one: logged and counted)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        event(log, "no saved state", path=str(path), kind=kind)
        return None
    except OSError as exc:
        REFUSED.labels(kind, "unreadable").inc()
        event(log, "saved state refused, starting without it", logging.ERROR, path=str(path), kind=kind,
              reason="unreadable", error=str(exc))
        return None
    try:
        saved = decode(data, kind=kind, owner=owner, max_age=max_age)
    except StateFileError as exc:
        REFUSED.labels(kind, exc.reason).inc()
        event(log, "saved state refused, starting without it", logging.ERROR, path=str(path), kind=kind,
              reason=exc.reason, error=str(exc))
        return None
    event(log, "saved state loaded", path=str(path), kind=kind, revision=saved.revision,
          age_s=round(saved.age(time.time()), 1), bytes=len(saved.payload))
    return saved


class DebouncedWriter:
    """Saves the latest state at most once per `delay` seconds, off the event loop.

    `changed(make)` is called after each applied change; `make()` builds the `Saved` value from
    the process's current state when the write happens (so a burst of changes is one write of
    the last one). `flush()` writes what is pending at once (on shutdown)."""

    def __init__(self, path: Path, delay: float = 0.5) -> None:
        self.path = path
        self.delay = delay
        self._make: Callable[[], Saved] | None = None
        self._task: asyncio.Task | None = None
        self.last_written: Saved | None = None

    def changed(self, make: Callable[[], Saved]) -> None:
        self._make = make
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._make is not None:
            await asyncio.sleep(self.delay)
            await self._write()

    async def _write(self) -> None:
        make, self._make = self._make, None
        if make is None:
            return
        saved = make()
        if await asyncio.to_thread(save, self.path, saved):
            self.last_written = saved

    async def flush(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._write()

"""The region map's builder: a child process that holds the walked GeoIP database and compiles
region maps on request, so that neither stage shares the serving process's interpreter.

Both stages of `geodns.region_map` are CPU work in Python and in long C-level steps (array
building, sorting, merging) that hold the GIL for tens of milliseconds at a time; in a thread
of the server they stalled its event loop (answers under load paused for up to ~30 ms during a
one-second rebuild). Here they run in a spawned process (nothing of the caller's threads or
sockets is inherited) that lives as long as the server, at a lower scheduling priority (`NICE`):

- `load(path)` walks the database (`read_networks`, seconds) in a process of its own that the
  builder starts and that exits after the walk, so its few hundred MB of temporaries are gone
  with it; the builder keeps the compact runs (about 22 MB for GeoLite2 City) and sends back a
  summary (`DatabaseInfo`). A failed load keeps the database loaded before.
- `compile(sites, default_region)` ranks and merges there (`compile_map`) and sends the finished
  `RegionMap` back: its small fields pickled, then each of its arrays (about 10 MB in all) as raw
  bytes, copied into arrays in the server a few MB at a time. The compile's temporaries are
  handed back to the system after each build (`malloc_trim`), so the builder's memory between
  builds is the runs plus an interpreter.

Calls block the calling thread until the answer (or `timeout`): the server makes them from a
worker thread, one at a time. A builder whose process died (killed, out of memory) raises
`BuilderGone`; the next `load` starts a new process. `close()` ends the process.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import multiprocessing
import multiprocessing.connection
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from geodns.region_map import Networks, RegionMap, RegionSite, compile_map, read_networks

DEFAULT_TIMEOUT = 600.0
# the builder's scheduling niceness: on a CPU it shares with the server (a pinned server's child
# inherits its CPU), the server's wake-ups preempt a build at once instead of waiting out the
# build's time slice (pauses of ~10 ms in answers at nice 0); a build still gets the CPU the
# server leaves, and about a tenth of it when the server saturates the CPU
NICE = 10


class BuilderGone(RuntimeError):
    """The builder process exited (or never answered); what it held is gone with it."""


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    """What the server logs and exports about the database the builder holds."""

    path: str
    database_type: str
    build_epoch: int
    leaves: int  # database networks walked
    places: int  # distinct coordinates
    nbytes: int  # bytes of the runs' arrays (held in the builder process)

    @classmethod
    def of(cls, networks: Networks) -> DatabaseInfo:
        return cls(networks.path, networks.database_type, networks.build_epoch, networks.leaves,
                   len(networks.latitudes) - 1, networks.nbytes())


class MapBuilder:
    """The builder process and its end of the pipe (see the module's docstring)."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self.loaded: DatabaseInfo | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def load(self, path: str | Path) -> DatabaseInfo:
        """Walk the database at `path` in the builder (started if it is not running)."""
        if self._conn is None:
            self._start()
        info = self._call("load", str(path))
        assert isinstance(info, DatabaseInfo)
        self.loaded = info
        return info

    def compile(self, sites: Sequence[RegionSite], default_region: str = "") -> RegionMap:
        """The region map of the loaded database against `sites`. Its arrays come as raw bytes,
        one message each, straight into arrays (no pickle, nothing recomputed here): the calling
        thread holds the GIL for one array's copy at a time (a few MB), and lets it go while it
        waits for the next."""
        if self._conn is None or self.loaded is None:
            raise BuilderGone("no database loaded in the map builder")
        head = self._call("compile", (tuple(sites), default_region))
        assert isinstance(head, dict)
        conn = self._conn
        assert conn is not None
        rmap = object.__new__(RegionMap)
        try:
            for name, typecode in head.pop("arrays"):
                if not conn.poll(self.timeout):
                    raise EOFError("no array")
                object.__setattr__(rmap, name, array(typecode, conn.recv_bytes()))
        except (EOFError, OSError) as exc:
            self.close()
            raise BuilderGone("the map builder exited while sending a map") from exc
        for name, value in head.items():
            object.__setattr__(rmap, name, value)
        return rmap

    def close(self) -> None:
        atexit.unregister(self.close)
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        self.loaded = None
        if conn is not None:
            conn.close()  # the child reads EOF and exits
        if proc is not None:
            proc.join(2)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)

    # -- the pipe ----------------------------------------------------------------------------

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        # not a daemon: it starts the walk's process (daemons may not have children); it exits
        # when its pipe closes, and the server's exit closes it
        proc = ctx.Process(target=_serve, args=(theirs,), name="geodns-map-builder", daemon=False)
        proc.start()
        theirs.close()
        self._proc, self._conn = proc, ours
        # before multiprocessing's own exit handler, which joins non-daemon children: closed
        # first, the builder reads EOF and exits, so an exit that skipped close() cannot hang
        atexit.register(self.close)

    def _call(self, command: str, argument: object) -> object:
        conn = self._conn
        assert conn is not None
        try:
            conn.send((command, argument))
            if not conn.poll(self.timeout):
                self.close()
                raise BuilderGone(f"the map builder did not answer {command!r} within {self.timeout:.0f} s")
            kind, payload = conn.recv()
        except (EOFError, OSError) as exc:
            code = self._proc.exitcode if self._proc is not None else None
            self.close()
            raise BuilderGone(f"the map builder exited (status {code}) during {command!r}") from exc
        if kind == "error":
            raise ValueError(payload)
        return payload


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """The builder process: answer requests until the server closes its end."""
    with contextlib.suppress(OSError):
        os.nice(NICE)
    networks: Networks | None = None
    while True:
        try:
            command, argument = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if command == "load":
                fresh = _walk_apart(argument)  # a failure keeps the database loaded before
                networks = fresh
                result: object = DatabaseInfo.of(fresh)
            elif command == "compile":
                if networks is None:
                    raise ValueError("no database loaded")
                rmap = compile_map(networks, *argument)
                parts = {f.name: getattr(rmap, f.name) for f in fields(rmap)}
                arrays = [(name, value) for name, value in parts.items() if isinstance(value, array)]
                head = {name: value for name, value in parts.items() if not isinstance(value, array)}
                head["arrays"] = [(name, a.typecode) for name, a in arrays]
                conn.send(("ok", head))
                for _, a in arrays:
                    conn.send_bytes(a)
                del rmap, parts, arrays, head
                _trim()
                continue
            else:
                raise ValueError(f"unknown request {command!r}")
            reply: tuple[str, object] = ("ok", result)
        except Exception as exc:
            reply = ("error", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


def _walk_apart(path: str) -> Networks:
    """`read_networks(path)` in a spawned process that exits after the walk."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_walk, args=(path, send), name="geodns-geoip-walk", daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(DEFAULT_TIMEOUT):
            raise TimeoutError(f"walking {path} took longer than {DEFAULT_TIMEOUT:.0f} s")
        kind, payload = recv.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"the GeoIP walk exited with status {proc.exitcode}") from None
    finally:
        recv.close()
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    if kind == "error":
        raise ValueError(payload)
    assert isinstance(payload, Networks)
    return payload


def _walk(path: str, conn: multiprocessing.connection.Connection) -> None:
    try:
        result: tuple[str, object] = ("ok", read_networks(path))
    except Exception as exc:
        result = ("error", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
    conn.send(result)
    conn.close()


def _trim() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim; nothing elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

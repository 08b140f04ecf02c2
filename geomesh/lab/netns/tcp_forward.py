"""A TCP relay between two network namespaces, on threads: accept on one side, connect on the other.

`TcpForward` accepts on a listening socket and relays each connection to a target opened by a
`connect` callable; because a socket stays in the namespace it was created in, the listener and
the connect function decide which namespaces the relay joins. `Namespace.forward_tcp` listens
inside a namespace and connects in the host's (an agent in a namespace reaching a coordinator on
the host's 127.0.0.1); `Namespace.expose_tcp` listens in the host's namespace and connects inside
(a host-side client reaching a server in the namespace). Threads, not asyncio, so it works
whatever event loop the caller runs (or none).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from geomesh.logs import event

log = logging.getLogger(__name__)


class TcpForward:
    """Accepts on `listener` and relays each connection to `target` (opened by `connect`).

    Threads, not asyncio, so it works whatever event loop the caller runs (or none); at most
    `max_connections` at once, further ones are closed at once."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket],
                 max_connections: int = 64) -> None:
        self.listener = listener
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._connect = connect
        self._max = max_connections
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"fwd-{self.address[1]}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or len(self._socks) >= 2 * self._max:
                    conn.close()
                    continue
                self._socks.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            upstream = self._connect()
        except OSError as e:
            event(log, "tcp forward: upstream connect failed", logging.WARNING, port=self.port, error=str(e))
            self._drop(conn)
            return
        with self._lock:
            self._socks.add(upstream)
        done = threading.Event()
        threading.Thread(target=self._pump, args=(upstream, conn, done), daemon=True).start()
        self._pump(conn, upstream, done)

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if done.is_set():  # the other direction finished first: both are done
            self._drop(src)
            self._drop(dst)
        else:
            done.set()

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(timeout=2)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on (host, port), in whatever namespace the calling thread is in."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock

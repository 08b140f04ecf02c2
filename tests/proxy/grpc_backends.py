"""Real gRPC servers (grpcio, cleartext HTTP/2) as `g` app backends, and a client for the gateway.

Generic handlers, no generated code: methods of the service `geomesh.test.Echo` take and return
raw bytes.

    Who     the backend's name and the call's metadata, as JSON
    Echo    the request bytes back (large messages exercise HTTP/2 flow control through the gateway)
    Stream  bidirectional: every message back, in order
    Hold    blocks until `release()` (a call in flight, for least-connections tests), then Who

`h2_call` makes one such call by hand over a socket, for paths a grpcio client cannot take
(a PROXY v2 header first, as gateways forward to each other).
"""

from __future__ import annotations

import json
import socket
import threading
from concurrent import futures
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events

SERVICE = "geomesh.test.Echo"


class GrpcBackend:
    """`host`/`port`: where to listen; `g` names carry the port, so an app's backends share one
    port on different loopback addresses (127.0.0.11, .12, ...)."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.host = host
        self.calls = 0
        self.held = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                  options=[("grpc.so_reuseport", 0)])
        handlers = {
            "Who": grpc.unary_unary_rpc_method_handler(self._who),
            "Echo": grpc.unary_unary_rpc_method_handler(self._echo),
            "Stream": grpc.stream_stream_rpc_method_handler(self._stream),
            "Hold": grpc.unary_unary_rpc_method_handler(self._hold),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot listen on {host}:{port}")
        self.server.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    def _who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        meta = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return json.dumps({"backend": self.name, "metadata": meta, "request": request.decode("latin-1")}).encode()

    def _echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        return request

    def _stream(self, requests, context: grpc.ServicerContext):
        self._count()
        yield from requests

    def _hold(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.held += 1
        self._release.wait(20)
        return self._who(request, context)

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        self.server.stop(0).wait(5)


def gateway_channel(address: tuple[str, int], ca_path: Path, name: str) -> grpc.Channel:
    """A gRPC channel to the gateway's TLS port for the `g` name `name` (SNI and :authority)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_path.read_bytes())
    return grpc.secure_channel(f"{address[0]}:{address[1]}", creds,
                               options=[("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)])


def method(channel: grpc.Channel, name: str, *, stream: bool = False):
    path = f"/{SERVICE}/{name}"
    if stream:
        return channel.stream_stream(path)
    return channel.unary_unary(path)


def who(channel: grpc.Channel, request: bytes = b"", **kw) -> dict:
    return json.loads(method(channel, "Who")(request, timeout=10, **kw))


def start_on_one_port(names: list[str], first_host: int = 11) -> list[GrpcBackend]:
    """Backends named `names` on 127.0.0.<first_host>, <first_host + 1>, ... all on the same port."""
    for _ in range(20):
        first = GrpcBackend(names[0], f"127.0.0.{first_host}")
        out = [first]
        try:
            for i, name in enumerate(names[1:], 1):
                out.append(GrpcBackend(name, f"127.0.0.{first_host + i}", first.port))
            return out
        except OSError:  # that port is taken on another address: try another
            for b in out:
                b.stop()
    raise OSError("no port free on all the loopback addresses")


def h2_call(sock: socket.socket, authority: str, path: str, payload: bytes, *,
            preamble: bytes = b"") -> tuple[dict[bytes, bytes], bytes, dict[bytes, bytes]]:
    """One gRPC unary call spoken by hand (the `h2` library) on `sock`, after `preamble` (a PROXY v2
    header, as a forwarding gateway sends): (response headers, the response message, trailers)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
                            ("content-type", "application/grpc"), ("te", "trailers")])
    conn.send_data(sid, b"\x00" + len(payload).to_bytes(4, "big") + payload, end_stream=True)
    sock.sendall(preamble + conn.data_to_send())
    headers: dict[bytes, bytes] = {}
    trailers: dict[bytes, bytes] = {}
    data = b""
    done = False
    while not done:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the call ended (got {headers}, {data!r})")
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = dict(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers = dict(ev.headers)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        sock.sendall(conn.data_to_send())
    return headers, data[5:], trailers

"""The HTTP/2 pieces both sides of the `g` proxy share: the `h2` configuration, the opening
settings and windows, sending within a flow-control window, and the headers never forwarded.

`h2proxy.H2Downstream` (the client's connection, server side) and `h2_upstream.H2Upstream` (a
backend connection, client side) both run an `h2` state machine configured by `h2_config` and
opened by `open_connection` with the gateway's windows: 256 KiB per stream, 1 MiB per connection
(HTTP/2's default 64 KiB would cap a forwarded call at 64 KiB per round trip between regions;
the connection window bounds what one connection can make the gateway hold). `send_windowed`
moves queued data as far as a stream's window allows, in both directions, and says how much may
be acknowledged to the side it came from.
"""

from __future__ import annotations

from collections import deque

import h2.config
import h2.connection
import h2.settings

from regional_gateway.proxy.client_address import CLIENT_ADDRESS_HEADERS

GRPC_UNAVAILABLE = 14
GRPC_DEADLINE_EXCEEDED = 4
# connection-specific headers have no place in HTTP/2 (RFC 9113 8.2.2); h2 refuses them anyway
HOP_HEADERS = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
DROP_HEADERS = HOP_HEADERS | CLIENT_ADDRESS_HEADERS  # never forwarded as the client sent them
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    # inbound headers are validated on both sides; what goes out is those headers (plus the gateway's
    # own), so outbound validation would only check them twice: it is off, for speed
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None, validate_inbound_headers=True,
                                     validate_outbound_headers=False, normalize_outbound_headers=False)


def open_connection(conn: h2.connection.H2Connection, settings: dict[int, int] | None = None) -> None:
    """Send the connection preface with our settings and the larger connection window (the
    settings go in the preface itself: a SETTINGS frame queued before it would precede a client's
    connection magic)."""
    conn.local_settings = h2.settings.Settings(
        client=conn.config.client_side,
        initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, **(settings or {})})
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)


def send_windowed(conn: h2.connection.H2Connection, sid: int, queue: deque[tuple[bytes, int]]) -> int:
    """Send queued (data, length) chunks on stream `sid` as far as its flow-control window and the
    frame size allow; what does not fit stays queued (split if need be). Returns the sum of the
    `length`s of the chunks fully sent: what may now be acknowledged to the side they came from."""
    done = 0
    while queue:
        data, length = queue[0]
        room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if len(data) > room:
            if room <= 0:
                break
            conn.send_data(sid, data[:room])
            queue[0] = (data[room:], length)
            continue
        queue.popleft()
        if data:
            conn.send_data(sid, data)
        done += length
    return done

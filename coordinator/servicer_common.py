"""What the servicers share: their base, request-name checks, stream metrics and the send deadline.

`ServicerBase` holds what every servicer reads and writes through: the fan-out interface
(`coordinator.fanout.Fanout`: immutable snapshots for reads, deltas, shared messages and the
change signal for streams), `Operations` for writes and `Access` for the caller. The stream
metrics are shared by the Watch stream (`coordinator.routing_feed`) and the gateway session
(`coordinator.gateway_session`), labelled by kind; `send_deadline` is how both end a stream whose
client does not take a message in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from google.protobuf.message import Message
from prometheus_client import Counter, Gauge

from coordinator.access import Access
from coordinator.enrollment import EnrollmentOps
from coordinator.fanout import Fanout
from coordinator.operations import Operations
from geomesh import validate

log = logging.getLogger("geomesh.coordinator")

SESSIONS = Gauge("geomesh_coordinator_sessions", "open streams", ["kind"])
SENT = Counter("geomesh_coordinator_stream_messages_total", "messages sent on streams", ["kind", "type"])
SENT_BYTES = Counter("geomesh_coordinator_stream_bytes_total", "bytes sent on streams", ["kind"])
SLOW_READERS = Counter("geomesh_coordinator_slow_readers_dropped_total",
                       "streams ended because one send was not taken by the client in time", ["kind"])


def checked_name(field: str, value: str) -> str:
    """A request's name field as a DNS label (ValidationError naming `field` otherwise)."""
    return validate.dns_label(field, value)


class ServicerBase:
    """What every servicer holds: the fan-out (reads and streams), the writes, the access judge."""

    def __init__(self, feed: Fanout, ops: Operations, access: Access) -> None:
        self.feed = feed
        self.ops = ops
        self.access = access
        self.enrollment_ops = EnrollmentOps(ops)


def current_task() -> asyncio.Task:
    task = asyncio.current_task()
    assert task is not None
    return task


@contextlib.contextmanager
def send_deadline(timeout: float, expire: Callable[[], object]) -> Iterator[None]:
    """Call `expire` if the `yield` inside (one send to the client) takes longer than `timeout`.

    A stream's `yield` returns only once the transport took the message: a client that does not
    open its flow-control window blocks it forever, and with it whatever the handler would check
    next. The timer runs on the loop, apart from the blocked handler."""
    handle = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        yield
    finally:
        handle.cancel()


def wire(message: bytes | Message) -> bytes:
    """Response serializer of streams that yield pre-serialized, shared messages (or messages)."""
    return message if isinstance(message, bytes) else message.SerializeToString()

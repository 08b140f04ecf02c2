"""Reading from a client connection, paused for as many reasons as hold at once.

A client connection stops reading when the gateway cannot take more of what it sends: a request
waits behind another (`PIPELINE`), the backend's write buffer is full (`BACKPRESSURE`, from
`upstream`), body bytes are held while the backend connection is being made (`PENDING`), or a
connect is in progress (`CONNECT`). `FlowControl` keeps the set of reasons as bits: the transport
is paused when the first one is set and resumed when the last one goes, so one cause ending never
resumes reading another still needs paused. It also remembers whether reading was paused during
the current body-rate window (`paused_in_window`): the gateway's own pauses are never held
against a slow client (`downstream`'s body timeouts). `pass_eof` is the one half-close rule of
the byte tunnels (upgraded HTTP/1.1 connections, TLS passthrough): one side's EOF is passed on
to the other while the other direction still flows.
"""

from __future__ import annotations

from typing import Any

PIPELINE = 1  # a request is queued behind the one in flight
BACKPRESSURE = 2  # the backend's (or the tunnel's) write buffer is full
PENDING = 4  # body bytes held until the backend connection is up are over the bound
CONNECT = 8  # a backend connection is being made
ALL = 0xFF


class FlowControl:
    __slots__ = ("transport", "reasons", "paused_in_window")

    def __init__(self) -> None:
        self.transport: Any = None  # None before connection_made and after the connection ended
        self.reasons = 0
        self.paused_in_window = False

    def pause(self, reason: int) -> None:
        if not self.reasons and self.transport is not None:
            self.transport.pause_reading()
            self.paused_in_window = True  # the body-rate window cannot blame the client for this pause
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons and self.transport is not None:
                self.transport.resume_reading()

    def new_window(self) -> None:
        """A body-rate window starts: it was paused in it only if it is paused now."""
        self.paused_in_window = bool(self.reasons)

    def stop(self) -> None:
        """The connection ended (or its transport went to another protocol): touch it no more."""
        self.transport = None


def pass_eof(to: Any, other_ended: bool) -> bool:
    """One side of a tunnel sent EOF: half-close `to` (the other side's transport) and return True,
    or return False when the tunnel should close instead (the other direction ended already, or
    `to` cannot half-close)."""
    if other_ended or not to.can_write_eof():
        return False
    to.write_eof()
    return True

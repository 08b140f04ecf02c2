"""What every viewer is sent: the current view, the recent events and the coordinator link's state.

`Board` holds the latest `View` and the feed of recent events (diffed from successive overviews),
and renders them once per change into the JSON document that `/api/state` serves and the event
stream pushes: one serialization per change, shared by every viewer. No I/O.
"""

from __future__ import annotations

import json
import time
from collections import deque

from geomesh.api import geomesh_pb2 as pb
from status_page.view import EMPTY, MAX_EVENTS, Event, View, events_between, view_of


class Board:
    def __init__(self, source: str, max_events: int = MAX_EVENTS) -> None:
        self.source = source  # where the data comes from, shown on the page
        self.view: View = EMPTY
        self.events: deque[Event] = deque(maxlen=max_events)
        self.connected = False
        self.error = ""
        self.updated_at = 0.0
        self.document = self.render()

    def apply(self, overview: pb.Overview, at: float | None = None) -> bytes:
        """Take a new overview; returns the new document."""
        at = time.time() if at is None else at
        new = view_of(overview)
        self.events.extend(events_between(self.view, new, at))
        self.view = new
        self.connected, self.error, self.updated_at = True, "", at
        self.document = self.render()
        return self.document

    def link(self, connected: bool, error: str = "", at: float | None = None) -> bytes:
        """The coordinator link went up or down; returns the new document."""
        at = time.time() if at is None else at
        if connected != self.connected:
            text = "coordinator connected" if connected else f"coordinator unreachable: {error}"
            self.events.append(Event(at, "coordinator", self.source, text))
        self.connected, self.error = connected, error
        self.document = self.render()
        return self.document

    def render(self) -> bytes:
        doc = {"source": self.source, "connected": self.connected, "error": self.error,
               "updated_at": self.updated_at, "view": self.view.as_json(),
               "events": [e.as_json() for e in self.events]}
        return json.dumps(doc, separators=(",", ":")).encode()

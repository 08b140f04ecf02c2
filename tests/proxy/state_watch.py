"""Every state an HTTP/1.1 client connection enters, checked against `conn_state`'s table as it happens.

The gateway assigns `conn.state` as a plain attribute (no check on its hot path). For the proxy
tests, `install()` puts a data descriptor named `state` on `Http1Exchanges` (the base of
`downstream.ClientConnection`): each assignment is checked with `conn_state.transition` and stored
in the instance's own `__dict__` under the same name, so a connection made while it is installed
keeps working if it is removed. A move the table does not allow is recorded, never raised into the
gateway (whose loop runs in another thread), and `tests/proxy/conftest.py` fails the test that
made it. The moves seen are counted too: `tests/proxy/test_conn_lifecycle.py` asserts the table has
no move the code never makes in its scenarios.
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from typing import Any

from regional_gateway.proxy.conn_state import ConnState, IllegalTransition, transition
from regional_gateway.proxy.http1_exchanges import Http1Exchanges


class StateWatch:
    """The data descriptor, and what it saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.illegal: list[str] = []  # each: the error and where the assignment was made
        self.moves: Counter[tuple[ConnState, ConnState]] = Counter()

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__["state"]
        except KeyError:
            raise AttributeError("state") from None

    def __set__(self, obj: Any, new: ConnState) -> None:
        old = obj.__dict__.get("state")
        obj.__dict__["state"] = new
        if old is None or old is new:  # the first state (`Http1Exchanges.__init__`), or no move
            return
        try:
            transition(old, new)
        except IllegalTransition as exc:
            where = "".join(traceback.format_stack(limit=4)[:-1])
            with self.lock:
                self.illegal.append(f"{exc}\n{where}")
            return
        with self.lock:
            self.moves[(old, new)] += 1

    def take_illegal(self) -> list[str]:
        with self.lock:
            found, self.illegal = self.illegal, []
        return found


def install() -> StateWatch:
    """Watch every connection's state from now on (idempotent)."""
    current = Http1Exchanges.__dict__.get("state")
    if isinstance(current, StateWatch):
        return current
    watch = StateWatch()
    Http1Exchanges.state = watch  # type: ignore[assignment,misc]
    return watch

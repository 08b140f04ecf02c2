"""geomesh.logs: one JSON object per line, and a handler that follows sys.stderr."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from geomesh import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, stderr = root.handlers[:], root.level, sys.stderr
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.stderr = stderr


def test_json_lines_carry_the_fields(restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.setup("info", "json")
    logs.event(logging.getLogger("geomesh.t"), "peer applied", peer="gw-b", port=51820)
    logging.getLogger("geomesh.t").debug("below the level")
    line, = out.getvalue().splitlines()
    record = json.loads(line)
    assert (record["msg"], record["peer"], record["port"], record["level"]) == ("peer applied", "gw-b", 51820, "info")


def test_a_swapped_stderr_keeps_the_log_and_a_closed_one_is_not_written(restore_logging: None) -> None:
    first = io.StringIO()
    sys.stderr = first
    logs.setup("info", "text")
    logging.getLogger("geomesh.t").info("one")
    first.close()  # what a test's capture or a daemon's redirect does to the stream given at setup
    second = io.StringIO()
    sys.stderr = second
    logging.getLogger("geomesh.t").info("two", extra={"fields": {"k": "v"}})
    assert second.getvalue() == "I geomesh.t: two k=v\n"

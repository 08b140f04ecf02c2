"""Fixtures for the certificate tests: real pebble ACME servers.

`pebble_factory(dns_server, **kwargs)` starts a `PebbleProcess` (geomesh/lab/pebble.py) in the
test's tmp_path whose validation DNS is `dns_server` ("127.0.0.1:PORT"); every one started is
stopped after the test.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from geomesh.lab.pebble import PebbleProcess


@pytest.fixture
def pebble_factory(tmp_path: Path) -> Iterator[Callable[..., PebbleProcess]]:
    if shutil.which("pebble") is None:
        pytest.fail("pebble is not installed: run scripts/install.sh (./run test does)")
    started: list[PebbleProcess] = []

    def make(dns_server: str, **kwargs: object) -> PebbleProcess:
        proc = PebbleProcess(tmp_path / f"pebble{len(started)}", dns_server=dns_server, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()

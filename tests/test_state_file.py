"""The persisted-state file (geomesh.state_file): round trips, and every way a file is refused
(corrupt, truncated, newer format, foreign, too old) as a typed error; `load` never raises and
counts what it refused; `write_atomic` leaves no temp file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from geomesh import state_file as sf

GOOD = sf.Saved("gateway", "gw-eu-1", 812, 1_800_000_000.0, b"\x08\x01payload\x00\xff")


def _header(data: bytes) -> dict:
    return json.loads(data.partition(b"\n")[0])


def _with_header(**changes) -> bytes:
    data = sf.encode(GOOD)
    head = _header(data)
    head.update(changes)
    return json.dumps(head).encode() + b"\n" + data.partition(b"\n")[2]


@pytest.mark.parametrize("saved", [
    GOOD,
    sf.Saved("geodns", "geo.example.com", 0, 0.0, b""),
    sf.Saved("gateway", "g", 2**40, 1.5, bytes(range(256)) * 100),
])
def test_round_trip(saved: sf.Saved) -> None:
    assert sf.decode(sf.encode(saved), kind=saved.kind, owner=saved.owner) == saved


CASES = [
    # (name, bytes, error)
    ("empty", b"", sf.Corrupt),
    ("garbage", b"\x00\x01\x02 not a state file\n", sf.Corrupt),
    ("header not json", b"{not json\n", sf.Corrupt),
    ("header a list", b"[1, 2]\n", sf.Corrupt),
    ("header cut", sf.encode(GOOD)[:20], sf.Truncated),
    ("payload cut", sf.encode(GOOD)[:-3], sf.Truncated),
    ("payload flipped", sf.encode(GOOD)[:-1] + b"\x00", sf.Corrupt),
    ("trailing bytes", sf.encode(GOOD) + b"junk", sf.Corrupt),
    ("newer format", _with_header(format=sf.FORMAT + 1), sf.NewerFormat),
    ("format zero", _with_header(format=0), sf.Corrupt),
    ("format a string", _with_header(format="1"), sf.Corrupt),
    ("no sha256", _with_header(sha256=None), sf.Corrupt),
    ("negative revision", _with_header(revision=-1), sf.Corrupt),
    ("huge length", _with_header(length=1 << 40), sf.Corrupt),
    ("another gateway", _with_header(owner="gw-us-1"), sf.Foreign),
    ("another kind", _with_header(kind="geodns"), sf.Foreign),
]


@pytest.mark.parametrize(("name", "data", "error"), CASES, ids=[c[0] for c in CASES])
def test_refused(name: str, data: bytes, error: type[sf.StateFileError]) -> None:
    with pytest.raises(error) as info:
        sf.decode(data, kind="gateway", owner="gw-eu-1")
    assert str(info.value)  # says why


def test_max_age() -> None:
    data = sf.encode(GOOD)
    assert sf.decode(data, kind="gateway", owner="gw-eu-1", max_age=60, now=GOOD.written_at + 59) == GOOD
    with pytest.raises(sf.TooOld):
        sf.decode(data, kind="gateway", owner="gw-eu-1", max_age=60, now=GOOD.written_at + 61)
    # 0 = serve indefinitely
    assert sf.decode(data, kind="gateway", owner="gw-eu-1", max_age=0, now=GOOD.written_at + 10**9) == GOOD


def _refused(kind: str, reason: str) -> float:
    return REGISTRY.get_sample_value("geomesh_state_file_refused_total", {"kind": kind, "reason": reason}) or 0.0


def test_load_and_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state" / "gateway.state"
    assert sf.load(path, kind="gateway", owner="gw-eu-1") is None  # no file: no state, no error
    assert sf.save(path, GOOD)
    assert sf.load(path, kind="gateway", owner="gw-eu-1") == GOOD
    assert os.listdir(path.parent) == ["gateway.state"]  # no temp file left
    # a corrupt file: refused with a log line naming the reason, counted, None
    path.write_bytes(sf.encode(GOOD)[:-1] + b"?")
    before = _refused("gateway", "corrupt")
    assert sf.load(path, kind="gateway", owner="gw-eu-1") is None
    assert _refused("gateway", "corrupt") == before + 1
    line = next(r for r in caplog.records if r.getMessage().startswith("saved state refused"))
    assert "checksum" in str(getattr(line, "fields", {}))
    # a directory where the file should be: unreadable, not a crash
    path.unlink()
    path.mkdir()
    assert sf.load(path, kind="gateway", owner="gw-eu-1") is None
    assert not sf.save(path, GOOD)  # cannot replace a directory: logged, False


async def test_debounced_writer_writes_the_last_change(tmp_path: Path) -> None:
    path = tmp_path / "s"
    writer = sf.DebouncedWriter(path, delay=0.05)
    for rev in range(1, 20):
        writer.changed(lambda rev=rev: sf.Saved("gateway", "gw-eu-1", rev, 1.0, b"x"))
    await writer.flush()
    assert sf.load(path, kind="gateway", owner="gw-eu-1").revision == 19  # type: ignore[union-attr]

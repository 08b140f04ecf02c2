"""The TOML the documentation shows loads: every ```toml block of `docs/*.md`, `README.md` and
`deploy/README.md`, and the example files the docs name (`deploy/dns-state.toml`,
`deploy/gateway.example.toml`, `deploy/regions/*.toml`).

Each block is parsed; a block that is one of the project's files is then loaded with that file's
real loader, which checks every key and value:

| kind | recognised by | loader |
|---|---|---|
| `state` | a `[zone]` table | `geodns.static_state.load` (geomesh-dns `--state`) |
| `gateway` | `coordinators`, `public_ip`, `[tls]` or `[wireguard]` | `regional_gateway.agent_config.load` |
| `routes` | a top-level `zone = "..."` string | `regional_gateway.proxy.routes_file.load_routes` |
| `region` | top-level `name`, `latitude`, `longitude` | `geomesh.regions_file.load` |
| `apply` | the marker only | `geomesh.apply.load` (`geomesh apply` files) |

A marker comment inside the block (`# geomesh-example: state|gateway|routes|region|apply|fragment`)
overrides the guess; `fragment` (a part of a file, shown for one key) is only parsed. A block
the rules cannot place fails the test: mark it. Certificate files a block names (`[[certificates]]`)
are issued for the test by a throwaway CA and the block's paths pointed at them, so the loaders
still read and check real PEM files.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from geodns import static_state
from geomesh import apply, regions_file
from regional_gateway import agent_config
from regional_gateway.proxy.routes_file import load_routes

from .proxy.certs import TestCA

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "deploy" / "README.md"]
KINDS = ("state", "gateway", "routes", "region", "apply", "fragment")
_BLOCK = re.compile(r"^```toml[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_MARKER = re.compile(r"^\s*#\s*geomesh-example:\s*(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    where: str  # path:line, for the test id
    text: str


def doc_blocks() -> list[Block]:
    out = []
    for path in DOCS:
        if not path.is_file():
            continue
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append(Block(f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return out


def kind_of(text: str, data: dict[str, Any]) -> str | None:
    """The kind of file a block is: its marker, else a guess from its keys (None: cannot tell)."""
    m = _MARKER.search(text)
    if m is not None:
        assert m.group(1) in KINDS, f"unknown marker {m.group(1)!r}; one of {', '.join(KINDS)}"
        return m.group(1)
    if isinstance(data.get("zone"), dict):
        return "state"
    if {"coordinators", "public_ip", "tls", "wireguard"} & set(data):
        return "gateway"
    if isinstance(data.get("zone"), str):
        return "routes"
    if {"name", "latitude", "longitude"} <= set(data):
        return "region"
    return None


def with_real_certificates(text: str, data: dict[str, Any], tmp: Path) -> str:
    """`text` with each `[[certificates]]` cert/key path replaced by a freshly issued PEM file."""
    (tmp / "ca").mkdir(exist_ok=True)
    ca = TestCA(tmp / "ca")
    for i, entry in enumerate(data.get("certificates", [])):
        if not isinstance(entry, dict) or not {"cert", "key"} <= set(entry):
            continue  # the loader names what is missing
        cert, key = ca.issue(f"doc{i}", ["*.apps.example.com"])
        for old, new in ((entry["cert"], cert), (entry["key"], key)):
            text = text.replace(f'"{old}"', f'"{new}"')
    return text


def load(kind: str, text: str, data: dict[str, Any], tmp: Path) -> None:
    """Load `text` as a file of `kind` with the project's loader; raises what the loader raises."""
    path = tmp / "example.toml"
    if kind in ("gateway", "routes"):
        text = with_real_certificates(text, data, tmp)
    path.write_text(text)
    if kind == "state":
        view = static_state.load(path)
        assert view.regions, "a state example without regions answers nothing"
    elif kind == "gateway":
        agent_config.load(path)
    elif kind == "routes":
        load_routes(path)
    elif kind == "region":
        regions_file.load(path)
    elif kind == "apply":
        apply.load([path])


BLOCKS = doc_blocks()


def test_the_docs_have_toml_blocks() -> None:
    """The collection works: the state file and routes file examples are found."""
    kinds = set()
    for b in BLOCKS:
        kinds.add(kind_of(b.text, tomllib.loads(b.text)))
    assert {"state", "routes"} <= kinds, kinds


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_every_toml_block_of_the_docs_loads(block: Block, tmp_path: Path) -> None:
    try:
        data = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{block.where}: not valid TOML: {exc}")
    kind = kind_of(block.text, data)
    assert kind is not None, (f"{block.where}: cannot tell which file this block is; add "
                              f"'# geomesh-example: {'|'.join(KINDS)}'")
    load(kind, block.text, data, tmp_path)


EXAMPLES = [("deploy/dns-state.toml", "state"), ("deploy/gateway.example.toml", "gateway"),
            *((str(p.relative_to(ROOT)), "region") for p in sorted((ROOT / "deploy" / "regions").glob("*.toml")))]


@pytest.mark.parametrize("name, kind", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_the_example_files_load(name: str, kind: str, tmp_path: Path) -> None:
    text = (ROOT / name).read_text()
    data = tomllib.loads(text)
    assert kind_of(text, data) == kind
    load(kind, text, data, tmp_path)


def test_a_broken_example_fails(tmp_path: Path) -> None:
    """The check can fail: the old geodns.md example (an app in a region it never defines)."""
    text = ('[zone]\nname = "geo.example.com"\n[[regions]]\nname = "eu-central"\nlatitude = 50.11\n'
            'longitude = 8.68\n[[apps]]\nname = "shop"\nregions = ["eu-central", "us-east"]\n')
    with pytest.raises(static_state.StateError, match=r"apps\[0\]\.regions\[1\]"):
        load("state", text, tomllib.loads(text), tmp_path)

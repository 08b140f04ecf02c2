"""Every flag of every command (the console scripts and the benchmarks) says what it does in --help."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PARSERS = [
    ("geomesh.cli", "parser"),
    ("coordinator.main", "parser"),
    ("regional_gateway.main", "build_parser"),
    ("geodns.config", "parser"),
    ("bench.coordinator", "parser"),
    ("bench.mesh_convergence", "parser"),
    ("bench.dns", "parser"),
    ("bench.http", "parser"),
    ("bench.proxy_path", "parser"),
    ("bench.h2", "parser"),
]


def undocumented(p: argparse.ArgumentParser, path: str) -> list[str]:
    """Flags and positionals without help text, walking into subcommands."""
    missing = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += undocumented(sub, f"{path} {name}")
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize(("module", "factory"), PARSERS, ids=[m for m, _ in PARSERS])
def test_every_flag_has_help(module: str, factory: str) -> None:
    parser = getattr(importlib.import_module(module), factory)()
    assert undocumented(parser, parser.prog) == []


def test_the_walk_finds_a_flag_without_help() -> None:
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run it").add_argument("--fast", action="store_true")
    assert undocumented(p, "x") == ["x run: --fast"]


@pytest.mark.parametrize("script", ["geomesh", "geomesh-coordinator", "geomesh-gateway", "geomesh-dns"])
def test_console_scripts_print_help(script: str) -> None:
    exe = Path(sys.executable).parent / script
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "--help" in out.stdout

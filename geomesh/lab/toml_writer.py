"""TOML text from a dict: how the lab writes the config files of the processes it starts.

The standard library reads TOML (`tomllib`) but does not write it, and the lab's configs need
only a small part of the language, so this is a writer for exactly that part: a table of strings
(and paths, written as strings), integers, floats, booleans and arrays of those, with nested
tables written as `[a.b]` sections after the table's own keys. Strings are basic strings with
every character TOML requires escaped, keys are bare when they can be and quoted otherwise, so
the text reads back through `tomllib` to the same values. Anything else (None, a table inside an
array, an integer out of TOML's 64-bit range, an unknown type) is refused with a
`ValidationError` naming the dotted key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from geomesh.errors import ValidationError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_INT_RANGE = (-(2**63), 2**63 - 1)


def dumps(table: Mapping[str, Any], *, comment: str = "") -> str:
    """The TOML text of `table` (its own keys, then each sub-table as a section), after `comment`
    as `# ` lines when given."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    _write_table(table, (), lines)
    return "\n".join(lines) + "\n"


def _write_table(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    subtables = []
    for key, value in table.items():
        if not isinstance(key, str):
            raise ValidationError(_dotted(path) or "<table>", f"key {key!r} is not a string")
        if isinstance(value, Mapping):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value, (*path, key))}")
    for key, value in subtables:
        lines.append(f"[{'.'.join(_key(k) for k in (*path, key))}]")
        _write_table(value, (*path, key), lines)


def _value(value: Any, path: tuple[str, ...]) -> str:
    if isinstance(value, bool):  # before int: a bool is an int to Python
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise ValidationError(_dotted(path), f"{value} is outside TOML's 64-bit integer range")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has a '.' or an exponent, so it reads back as a float
    if isinstance(value, str | PurePath):
        return _string(str(value), path)
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = []
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                raise ValidationError(f"{_dotted(path)}[{i}]", "a table inside an array is not supported")
            items.append(_value(item, (*path[:-1], f"{path[-1]}[{i}]")))
        return "[" + ", ".join(items) + "]"
    if value is None:
        raise ValidationError(_dotted(path), "TOML has no null: leave the key out instead")
    raise ValidationError(_dotted(path), f"a {type(value).__name__} cannot be written as TOML")


def _string(text: str, path: tuple[str, ...]) -> str:
    out = []
    for ch in text:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValidationError(_dotted(path), f"{text!r} has a lone surrogate, which UTF-8 cannot hold")
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key, (key,))


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)

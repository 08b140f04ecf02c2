"""The lab's TOML writer, table-tested: what it writes reads back through tomllib to the same
values (strings with every character TOML escapes, quoted keys, nested tables after their table's
own keys, floats that stay floats), and what TOML cannot hold is refused naming the dotted key."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from geomesh.errors import ValidationError
from geomesh.lab.toml_writer import dumps


@pytest.mark.parametrize("value", [
    "plain", "", 'say "hi"', "back\\slash", "tab\tnew\nline\rcr", "\b\f", "\x00\x01\x1f\x7f", "ünïcødé ✓ 𝄞",
    "C:\\Users\\x", "'single' and \"\"\" triple", 0, -1, 2**63 - 1, -(2**63), 0.5, 10.0, -0.0, 1e20, 1e-7,
    True, False, [], ["a", "b"], [1, 2.5, "x", True], [[1, 2], ["a"]],
])
def test_values_read_back_the_same(value):
    assert tomllib.loads(dumps({"v": value}))["v"] == value
    assert type(tomllib.loads(dumps({"v": value}))["v"]) is type(value)


def test_special_floats_and_paths():
    data = tomllib.loads(dumps({"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "p": Path("/a b/\"c\".pem")}))
    assert math.isnan(data["nan"]) and data["inf"] == math.inf and data["ninf"] == -math.inf
    assert data["p"] == '/a b/"c".pem'


def test_tables_follow_their_tables_keys_whatever_the_dict_order():
    config = {"name": "gw", "tls": {"ca": "ca.pem"}, "port": 8080,
              "a": {"b": {"c": 1}, "d": 2}, "empty": {}, "odd key": {"x.y": 1, "": "e"}}
    text = dumps(config, comment="written by geomesh lab\nsecond line")
    assert text.startswith("# written by geomesh lab\n# second line\nname = \"gw\"\nport = 8080\n[tls]\n")
    assert tomllib.loads(text) == config


@pytest.mark.parametrize(("config", "field", "words"), [
    ({"tls": {"ca": None}}, "tls.ca", "no null"),
    ({"certificates": [{"cert": "a"}]}, "certificates[0]", "table inside an array"),
    ({"n": 2**63}, "n", "64-bit"),
    ({"r": {"x": [1, [2, b"raw"]]}}, "r.x[1][1]", "bytes"),
    ({"o": object()}, "o", "object"),
    ({"s": "bad \ud800 surrogate"}, "s", "surrogate"),
    ({"t": {1: "x"}}, "t", "not a string"),
])
def test_what_toml_cannot_hold_is_refused_naming_the_key(config, field, words):
    with pytest.raises(ValidationError) as err:
        dumps(config)
    assert err.value.field == field and words in err.value.message

"""Custom domains by TXT record: which names to look up for a host, and what their values say.

The owner of `shop.example` points it at an app by publishing, beside a CNAME (or A) to the
zone's gateway name, a TXT record at `_geomesh-app-address.shop.example` whose value is
`app=<name>` or `app=<name>:<port>` (the app's default port when none is named). The seed
platform's form is accepted too: `_dstack-app-address.shop.example` with `app-id=<name>` (the
seed shows no port in it, so none is read). geomesh's record wins when both exist; when its
lookup failed, the answer is a failure rather than the other record's word.

Pure: the TXT values (each record's strings joined, RFC 7208 style) in, an `AppAddress` or the
`Garbage` reasons out. Values are bounded before they are read: more than `MAX_RECORDS` records at
one name, a value over `MAX_VALUE` bytes, bytes that are not printable ASCII, a value that is not
the record's form, an app name that is not a DNS label, a port outside 1-65535, and two records
naming different apps are each a reason (counted by the caller) and mean "no mapping". A record
that is garbage beside one valid record does not spoil it: the valid one is used.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

GEOMESH_OWNER = "_geomesh-app-address"
DSTACK_OWNER = "_dstack-app-address"
OWNERS = (GEOMESH_OWNER, DSTACK_OWNER)  # in order of precedence
MAX_RECORDS = 8  # TXT records at one owner name; beyond, the whole set is garbage
MAX_VALUE = 255  # bytes of one record's value, its strings joined
MAX_NAME = 253  # a domain name, without the trailing dot
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_FORMS = {GEOMESH_OWNER: ("app=", True), DSTACK_OWNER: ("app-id=", False)}  # owner -> (prefix, port allowed)


class Garbage(enum.StrEnum):
    """Why a TXT value (or a record set) gives no mapping: the `reason` label of
    `geomesh_gateway_custom_domain_txt_rejected_total`."""

    NOT_APP_ADDRESS = "not_app_address"  # not `app=...` (`app-id=...` for the seed's owner name)
    TOO_LONG = "too_long"  # a value over MAX_VALUE bytes
    NOT_TEXT = "not_text"  # bytes that are not printable ASCII
    TOO_MANY_RECORDS = "too_many_records"  # more than MAX_RECORDS records at the owner name
    BAD_APP_NAME = "bad_app_name"  # the name is not a DNS label
    BAD_PORT = "bad_port"  # the port is not 1-65535
    CONFLICT = "conflict"  # valid records naming different apps or ports


@dataclass(frozen=True, slots=True)
class AppAddress:
    """What a custom domain's TXT record names: an app and a port (0: the app's default port)."""

    app: str
    port: int = 0
    owner: str = GEOMESH_OWNER  # which record said so

    @property
    def text(self) -> str:
        return f"{self.app}:{self.port}" if self.port else self.app


@dataclass(frozen=True, slots=True)
class RecordSet:
    """The verdict on the TXT records at one owner name: the address they name (None: no mapping)
    and the reasons the values that were refused were refused (one per refused value)."""

    address: AppAddress | None
    garbage: tuple[Garbage, ...] = ()


def owner_name(owner: str, host: str) -> str | None:
    """The TXT name to look up for `host` (canonical: lower case, no trailing dot), or None when
    the prefixed name would be longer than a domain name may be."""
    name = f"{owner}.{host}"
    return name if len(name) <= MAX_NAME else None


def parse_value(owner: str, value: bytes) -> AppAddress | Garbage:
    """One TXT value at `owner` (GEOMESH_OWNER or DSTACK_OWNER) -> the address it names, or why not."""
    if len(value) > MAX_VALUE:
        return Garbage.TOO_LONG
    if any(b < 0x20 or b > 0x7E for b in value):
        return Garbage.NOT_TEXT
    text = value.decode("ascii").strip()
    prefix, port_allowed = _FORMS[owner]
    if not text.startswith(prefix):
        return Garbage.NOT_APP_ADDRESS
    name, colon, port_s = text[len(prefix):].partition(":")
    name = name.strip().lower()
    if not _LABEL.fullmatch(name):
        return Garbage.BAD_APP_NAME
    if not colon:
        return AppAddress(name, 0, owner)
    if not port_allowed:
        return Garbage.NOT_APP_ADDRESS
    port_s = port_s.strip()
    if not port_s.isascii() or not port_s.isdigit() or len(port_s) > 5 or not 1 <= int(port_s) <= 65535:
        return Garbage.BAD_PORT
    return AppAddress(name, int(port_s), owner)


def read_records(owner: str, values: Sequence[bytes]) -> RecordSet:
    """All the TXT values at `owner` -> the one address they name, with the refused values' reasons."""
    if len(values) > MAX_RECORDS:
        return RecordSet(None, (Garbage.TOO_MANY_RECORDS,))
    found: set[AppAddress] = set()
    garbage: list[Garbage] = []
    for value in values:
        parsed = parse_value(owner, value)
        if isinstance(parsed, AppAddress):
            found.add(parsed)
        else:
            garbage.append(parsed)
    if len(found) > 1:
        return RecordSet(None, (*garbage, Garbage.CONFLICT))
    return RecordSet(next(iter(found), None), tuple(garbage))

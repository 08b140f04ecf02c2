"""Field validators: one function per rule, each raising `ValidationError` naming the field.

Used by the domain dataclasses in `geomesh.model` on construction, by config loaders and by the
servicers, so a rule is written once and reads the same everywhere.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import re

from geomesh.errors import ValidationError

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_FQDN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_TEXT = 64


def dns_label(field: str, value: str) -> str:
    """A lowercase RFC 1123 label: a-z, 0-9 and inner '-', 1-63 characters."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    if not _LABEL.match(value):
        raise ValidationError(
            field, f"{value[:80]!r} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
        )
    return value


def fqdn(field: str, value: str) -> str:
    """A lowercase domain name of at least two labels, without a trailing dot, at most 253 chars."""
    if not value:
        raise ValidationError(field, "is required")
    name = value.rstrip(".").lower()
    if len(name) > 253:
        raise ValidationError(field, "is longer than 253 characters")
    labels = name.split(".")
    if len(labels) < 2 or not all(_FQDN_LABEL.match(label) for label in labels):
        raise ValidationError(field, f"{value[:80]!r} is not a valid domain name")
    return name


def latitude(field: str, value: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not -90.0 <= value <= 90.0:
        raise ValidationError(field, f"{value!r} is outside -90..90")
    return float(value)


def longitude(field: str, value: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not -180.0 <= value <= 180.0:
        raise ValidationError(field, f"{value!r} is outside -180..180")
    return float(value)


def port(field: str, value: int, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or not low <= value <= 65535:
        raise ValidationError(field, f"{value!r} is not a port ({low}-65535)")
    return value


def ip_address(field: str, value: str, *, version: int | None = None, optional: bool = False) -> str:
    if not value:
        if optional:
            return ""
        raise ValidationError(field, "is required")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(field, f"{value[:80]!r} is not an IP address") from None
    if version is not None and addr.version != version:
        raise ValidationError(field, f"{value!r} is not an IPv{version} address")
    return str(addr)


def cidr(field: str, value: str, *, optional: bool = False) -> str:
    if not value:
        if optional:
            return ""
        raise ValidationError(field, "is required")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValidationError(field, f"{value[:80]!r} is not a CIDR network ({exc})") from None
    return str(net)


def wg_key(field: str, value: str) -> str:
    """A base64 WireGuard key: 32 bytes, 44 characters."""
    if not value:
        raise ValidationError(field, "is required")
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise ValidationError(field, "is not base64") from None
    if len(raw) != 32:
        raise ValidationError(field, f"decodes to {len(raw)} bytes, a WireGuard key has 32")
    return value


def text(field: str, value: str, *, max_len: int = MAX_TEXT) -> str:
    if len(value) > max_len:
        raise ValidationError(field, f"is longer than {max_len} characters")
    if any(ord(c) < 32 for c in value):
        raise ValidationError(field, "contains control characters")
    return value

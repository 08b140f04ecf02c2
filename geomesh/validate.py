"""Field validators: one function per rule, each raising `ValidationError` naming the field.

Used by the domain dataclasses in `geomesh.model` on construction, by config loaders and by the
servicers, so a rule is written once and reads the same everywhere.

Every string is capped before it is parsed (a label 63 characters, a display text 64, a domain
name 253, an IP address 45, a CIDR 49, a WireGuard key 44), so a megabyte-sized field costs a
length check, and a message quotes at most 80 characters of it. IP addresses are strict: no IPv6
zone id (`fe80::1%eth0`: probe finding 7). The rules about *which* addresses an instance or a
region's subnet may use (`instance_address`, `instance_subnet`) are write-time policy of the
coordinator, kept apart from the syntax so a reader never refuses a record it was sent.
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
MAX_LABEL = 63
MAX_FQDN = 253
MAX_IP = 45     # the longest IPv6 text: ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255
MAX_CIDR = 49   # an address and /128
MAX_WG_KEY = 44  # 32 bytes in base64
MAX_V6_SUBNET_PREFIX = 120  # an instance subnet's overlap check costs one etcd compare per prefix bit


def dns_label(field: str, value: str) -> str:
    """A lowercase RFC 1123 label: a-z, 0-9 and inner '-', 1-63 characters."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    if len(value) > MAX_LABEL:
        raise ValidationError(field, f"is longer than {MAX_LABEL} characters")
    if not _LABEL.match(value):
        raise ValidationError(
            field, f"{value[:80]!r} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
        )
    return value


def fqdn(field: str, value: str) -> str:
    """A lowercase domain name of at least two labels, without a trailing dot, at most 253 chars."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    if len(value) > MAX_FQDN + 1:  # one trailing dot allowed
        raise ValidationError(field, f"is longer than {MAX_FQDN} characters")
    name = value.rstrip(".").lower()
    if len(name) > MAX_FQDN:
        raise ValidationError(field, f"is longer than {MAX_FQDN} characters")
    labels = name.split(".")
    if len(labels) < 2 or not all(_FQDN_LABEL.match(label) for label in labels):
        raise ValidationError(field, f"{value[:80]!r} is not a valid domain name")
    return name


_OWNER_LABEL = re.compile(r"^(?:_?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?|_[a-z0-9-]{1,62})$")


def owner_name(field: str, value: str) -> str:
    """A record owner name: `fqdn` that also allows service labels with a leading underscore
    (`_acme-challenge`, `_geomesh-app-address`)."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    name = value.rstrip(".").lower()
    labels = name.split(".")
    if len(name) > MAX_FQDN or len(labels) < 2 or not all(_OWNER_LABEL.match(label) for label in labels):
        raise ValidationError(field, f"{value[:80]!r} is not a valid owner name")
    return name


def latitude(field: str, value: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not -90.0 <= value <= 90.0:
        raise ValidationError(field, f"{value!r:.80} is outside -90..90")
    return float(value)


def longitude(field: str, value: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not -180.0 <= value <= 180.0:
        raise ValidationError(field, f"{value!r:.80} is outside -180..180")
    return float(value)


def port(field: str, value: int, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or not low <= value <= 65535:
        raise ValidationError(field, f"{value!r:.80} is not a port ({low}-65535)")
    return value


def _address_text(field: str, value: object, what: str, longest: int, optional: bool) -> bool:
    """The checks an address and a network share before parsing: a string, present unless
    `optional` (False: absent and allowed), at most `longest` characters, no zone id."""
    if not isinstance(value, str):
        raise ValidationError(field, f"{value!r:.80} is not {what}")
    if not value:
        if optional:
            return False
        raise ValidationError(field, "is required")
    if len(value) > longest:
        raise ValidationError(field, f"is longer than {longest} characters")
    if "%" in value:
        raise ValidationError(field, f"{value!r} has a zone id ('%'): not allowed")
    return True


def ip_address(field: str, value: str, *, version: int | None = None, optional: bool = False) -> str:
    """An IPv4 or IPv6 address in canonical form; no zone id (`%eth0`), at most 45 characters."""
    if not _address_text(field, value, "an IP address", MAX_IP, optional):
        return ""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(field, f"{value!r} is not an IP address") from None
    if version is not None and addr.version != version:
        raise ValidationError(field, f"{value!r} is not an IPv{version} address")
    return str(addr)


def query_address(field: str, value: str) -> str:
    """`ip:port` or `[v6]:port` of a server one can query (a DNS server's answer address), in
    canonical form: not 0.0.0.0, :: or multicast, and a port 1-65535."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    if len(value) > MAX_IP + 8:
        raise ValidationError(field, f"is longer than {MAX_IP + 8} characters")
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not sep or not host or (":" in host and not bracketed):
        raise ValidationError(field, f"{value!r} is not ip:port (IPv6 as [v6]:port)")
    addr = ipaddress.ip_address(ip_address(field, host[1:-1] if bracketed else host))
    if bracketed and addr.version != 6:
        raise ValidationError(field, f"{value!r}: only IPv6 addresses go in brackets")
    if addr.is_unspecified or addr.is_multicast:
        raise ValidationError(field, f"{addr} cannot be queried (unspecified or multicast): give the address "
                                     "the server answers on")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValidationError(field, f"port {port[:10]!r} is not 1-65535")
    return f"[{addr}]:{int(port)}" if addr.version == 6 else f"{addr}:{int(port)}"


def cidr(field: str, value: str, *, optional: bool = False) -> str:
    """A CIDR network with no host bits set, no zone id, at most 49 characters."""
    if not _address_text(field, value, "a CIDR network", MAX_CIDR, optional):
        return ""
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValidationError(field, f"{value!r} is not a CIDR network ({exc})") from None
    return str(net)


_SPECIAL_ADDRESS = (("is_unspecified", "unspecified"), ("is_multicast", "multicast"),
                    ("is_link_local", "link-local"))


def instance_address(field: str, value: str, *, allow_loopback: bool = False) -> str:
    """An address a gateway can send an app's traffic to: a unicast address, not unspecified
    (0.0.0.0, ::), multicast, link-local, the IPv4 broadcast address, or loopback (a gateway's
    own host; allowed only when the coordinator runs with --allow-loopback-instances, as the
    tests and the loopback lab do)."""
    text = ip_address(field, value)
    addr = ipaddress.ip_address(text)
    for attr, what in _SPECIAL_ADDRESS:
        if getattr(addr, attr):
            raise ValidationError(field, f"{text} is a {what} address, not an instance's")
    if addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValidationError(field, f"{text} is the broadcast address, not an instance's")
    if addr.is_loopback and not allow_loopback:
        raise ValidationError(field, f"{text} is a loopback address (allowed only with --allow-loopback-instances)")
    return text


def instance_subnet(field: str, value: str, *, mesh: str = "") -> str:
    """A region's instance subnet: a CIDR that is not /0, not longer than /120 (IPv6), not
    loopback, multicast or link-local, and (given the coordinator's `mesh` CIDR) disjoint from
    the mesh range."""
    text = cidr(field, value, optional=True)
    if not text:
        return text
    net = ipaddress.ip_network(text)
    if net.prefixlen == 0:
        raise ValidationError(field, f"{text} covers every address: a /0 would take all traffic into the mesh")
    if net.version == 6 and net.prefixlen > MAX_V6_SUBNET_PREFIX:
        raise ValidationError(field, f"{text} is longer than /{MAX_V6_SUBNET_PREFIX}: too small for a region's instances")
    for attr, what in (("is_loopback", "loopback"), *_SPECIAL_ADDRESS[1:]):
        if getattr(net, attr):
            raise ValidationError(field, f"{text} is a {what} range")
    if mesh:
        mesh_net = ipaddress.ip_network(mesh)
        if net.version == mesh_net.version and net.overlaps(mesh_net):  # type: ignore[arg-type]
            raise ValidationError(field, f"{text} overlaps the mesh range {mesh}")
    return text


def wg_key(field: str, value: str) -> str:
    """A base64 WireGuard key: 32 bytes, 44 characters."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    if len(value) > MAX_WG_KEY:
        raise ValidationError(field, f"is longer than {MAX_WG_KEY} characters")
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise ValidationError(field, "is not base64") from None
    if len(raw) != 32:
        raise ValidationError(field, f"decodes to {len(raw)} bytes, a WireGuard key has 32")
    return value


def text(field: str, value: str, *, max_len: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"{value!r:.80} is not text")
    if len(value) > max_len:
        raise ValidationError(field, f"is longer than {max_len} characters")
    if any(ord(c) < 32 for c in value):
        raise ValidationError(field, "contains control characters")
    return value


_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_ACME_TOKEN = 256       # ACME tokens are 43 characters (RFC 8555 8.1: >= 128 bits, base64url)
MAX_KEY_AUTHORIZATION = 512


def acme_token(field: str, value: str) -> str:
    """An ACME challenge token: base64url without padding, 1-256 characters (it is a URL path
    segment, /.well-known/acme-challenge/<token>)."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    if len(value) > MAX_ACME_TOKEN:
        raise ValidationError(field, f"is longer than {MAX_ACME_TOKEN} characters")
    if not _B64URL.match(value):
        raise ValidationError(field, f"{value[:80]!r} is not base64url (A-Z, a-z, 0-9, '-', '_')")
    return value


def key_authorization(field: str, value: str, token: str) -> str:
    """An HTTP-01 key authorization for `token`: `<token>.<base64url account key thumbprint>`."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "is required")
    if len(value) > MAX_KEY_AUTHORIZATION:
        raise ValidationError(field, f"is longer than {MAX_KEY_AUTHORIZATION} characters")
    head, dot, thumbprint = value.partition(".")
    if head != token or not dot or not _B64URL.match(thumbprint):
        raise ValidationError(field, "is not <token>.<base64url thumbprint> for its token")
    return value

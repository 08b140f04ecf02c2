"""Field rules (`geomesh.validate`): strict IP syntax (no zone ids, probe finding 7), size caps on
every string before it is parsed, and the coordinator's write-time address policy."""

from __future__ import annotations

import pytest

from geomesh import validate as v
from geomesh.errors import ValidationError
from geomesh.model import Domain, Gateway, Instance, Region

KEY = "q" * 43 + "="


@pytest.mark.parametrize("call, message", [
    (lambda: v.ip_address("address", "fe80::1%eth0"), "zone id"),
    (lambda: v.ip_address("address", "fe80::1%\r\nX-Injected: yes"), "zone id"),
    (lambda: v.ip_address("address", "2001:db8::2%x"), "zone id"),
    (lambda: v.ip_address("address", "2001:db8::4%" + "b" * 1_000_000), "longer than 45"),
    (lambda: v.ip_address("address", "10.0.0.300"), "not an IP address"),
    (lambda: v.cidr("instance_subnet", "fe80::%1/64"), "zone id"),
    (lambda: v.cidr("instance_subnet", "10.0.0.0/8" + " " * 60), "longer than 49"),
    (lambda: v.dns_label("name", "a" * 1_000_000), "longer than 63"),
    (lambda: v.fqdn("fqdn", "a." * 200), "longer than 253"),
    (lambda: v.wg_key("wg_public_key", "q" * 1000), "longer than 44"),
    (lambda: v.text("display_name", "x" * 65), "longer than 64"),
    (lambda: v.port("port", "9" * 1_000_000), "is not a port"),
])
def test_bad_values_are_refused_naming_the_field_and_quoting_little(call, message):
    with pytest.raises(ValidationError) as info:
        call()
    assert message in str(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("address, loopback_ok, problem", [
    ("10.1.2.3", False, None),
    ("2001:db8::7", False, None),
    ("127.0.0.1", True, None),
    ("127.0.2.11", False, "loopback"),
    ("::1", False, "loopback"),
    ("0.0.0.0", True, "unspecified"),
    ("::", True, "unspecified"),
    ("169.254.1.1", True, "link-local"),
    ("fe80::1", True, "link-local"),
    ("224.0.0.1", True, "multicast"),
    ("ff02::1", True, "multicast"),
    ("255.255.255.255", True, "broadcast"),
])
def test_instance_address_policy(address, loopback_ok, problem):
    if problem is None:
        assert v.instance_address("address", address, allow_loopback=loopback_ok)
        return
    with pytest.raises(ValidationError, match=problem) as info:
        v.instance_address("address", address, allow_loopback=loopback_ok)
    assert info.value.field == "address"


@pytest.mark.parametrize("subnet, problem", [
    ("10.90.1.0/24", None),
    ("", None),
    ("fd00:90::/64", None),
    ("0.0.0.0/0", "every address"),
    ("::/0", "every address"),
    ("10.88.3.0/24", "overlaps the mesh"),
    ("10.0.0.0/8", "overlaps the mesh"),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/4", "multicast"),
    ("169.254.0.0/16", "link-local"),
])
def test_instance_subnet_policy(subnet, problem):
    if problem is None:
        assert v.instance_subnet("instance_subnet", subnet, mesh="10.88.0.0/16") == subnet
        return
    with pytest.raises(ValidationError, match=problem):
        v.instance_subnet("instance_subnet", subnet, mesh="10.88.0.0/16")


@pytest.mark.parametrize("make, field", [
    (lambda: Instance("web", "i1", "eu", "fe80::1%eth0", 80), "address"),
    (lambda: Instance("web", "i" * 64, "eu", "10.0.0.1", 80), "id"),
    (lambda: Gateway("g", "eu", "192.0.2.1", 51820, KEY, "", 8080, public_ipv6="2001:db8::9%" + "z" * 100), "public_ipv6"),
    (lambda: Gateway("g", "eu", "192.0.2.1", 51820, KEY + "=", "", 8080), "wg_public_key"),
    (lambda: Region("r", 1, 1, display_name="d" * 65), "display_name"),
    (lambda: Region("r", 1, 1, instance_subnet="10.0.0.0/8%x"), "instance_subnet"),
    (lambda: Domain("x" * 250 + ".com", "web"), "fqdn"),
])
def test_model_values_refuse_oversize_and_zone_ids(make, field):
    with pytest.raises(ValidationError) as info:
        make()
    assert info.value.field == field

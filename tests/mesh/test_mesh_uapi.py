"""wireguard-go UAPI text protocol: parsing get replies and encoding set transactions (pure)."""

from __future__ import annotations

import base64

import pytest

from regional_gateway.wireguard import uapi
from regional_gateway.wireguard.keys import to_hex
from regional_gateway.wireguard.peers import Peer, PeerUpdate, Plan

K1 = base64.b64encode(bytes([1]) * 32).decode()
K2 = base64.b64encode(bytes([2]) * 32).decode()
K3 = base64.b64encode(bytes([3]) * 32).decode()

# a reply as wireguard-go v0.0.20220316 writes it (two peers, one never handshaked)
GET_REPLY = (
    "private_key=" + "a0" * 32 + "\n"
    "listen_port=51820\n"
    "public_key=" + "01" * 32 + "\n"
    "preshared_key=" + "00" * 32 + "\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.11:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=250000000\n"
    "tx_bytes=1184\n"
    "rx_bytes=1036\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.77.0.2/32\n"
    "allowed_ip=10.200.1.0/24\n"
    "public_key=" + "02" * 32 + "\n"
    "preshared_key=" + "00" * 32 + "\n"
    "protocol_version=1\n"
    "endpoint=[2001:db8::5]:51821\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n\n"
)


def test_parse_get_device_and_peers() -> None:
    dev = uapi.parse_get(GET_REPLY.encode())
    assert dev.listen_port == 51820 and dev.private_key_hex == "a0" * 32
    assert set(dev.peers) == {K1, K2}
    p1, p2 = dev.peers[K1], dev.peers[K2]
    assert p1 == Peer(K1, "192.0.2.11:51820", ("10.200.1.0/24", "10.77.0.2/32"), 25)
    assert p1.last_handshake == pytest.approx(1700000000.25)
    assert (p1.rx_bytes, p1.tx_bytes) == (1036, 1184)
    assert p2.endpoint == "[2001:db8::5]:51821" and p2.allowed_ips == () and p2.last_handshake is None


def test_device_state_repr_hides_private_key() -> None:
    assert "a0a0" not in repr(uapi.parse_get(GET_REPLY))


def test_parse_get_empty_device_and_peer_without_endpoint() -> None:
    dev = uapi.parse_get("private_key=" + "00" * 32 + "\nlisten_port=0\npublic_key=" + "03" * 32 + "\nerrno=0\n\n")
    assert dev.peers[K3].endpoint is None and dev.listen_port == 0


@pytest.mark.parametrize("reply, message", [
    ("errno=-22\n\n", "errno=-22"),
    ("listen_port=51820\n\n", "no errno"),
    ("listen_port=x\nerrno=0\n\n", "not an integer"),
    ("garbage\nerrno=0\n\n", "malformed line"),
    ("public_key=zz\nerrno=0\n\n", "malformed public key"),
    ("public_key=" + "01" * 32 + "\nallowed_ip=10.0.0.300/8\nerrno=0\n\n", "invalid peer"),
])
def test_parse_get_errors(reply: str, message: str) -> None:
    with pytest.raises(uapi.UapiError, match=message):
        uapi.parse_get(reply)


def test_errno_is_positive_on_the_exception() -> None:
    with pytest.raises(uapi.UapiError) as info:
        uapi.check_errno("errno=-22\n\n")
    assert info.value.errno == 22


def test_reply_complete() -> None:
    assert uapi.reply_complete(b"errno=0\n\n")
    assert uapi.reply_complete(GET_REPLY.encode())
    assert not uapi.reply_complete(GET_REPLY.encode()[:-1])
    assert not uapi.reply_complete(b"listen_port=1\n\n")


def test_empty_plan_encodes_to_nothing() -> None:
    assert uapi.encode_plan(Plan()) == b""


def test_encode_plan_one_transaction_removes_updates_adds() -> None:
    new = Peer(K3, "192.0.2.13:51820", ("10.77.0.3/32",), 25)
    changed = Peer(K2, "198.51.100.2:51820", ("10.77.0.2/32",), 0)
    text = uapi.encode_plan(Plan(
        adds=(new,),
        updates=(PeerUpdate(changed, frozenset({"endpoint", "persistent_keepalive"})),),
        removes=(K1,),
    )).decode()
    assert text == (
        "set=1\n"
        f"public_key={to_hex(K1)}\nremove=true\n"
        f"public_key={to_hex(K2)}\nupdate_only=true\nendpoint=198.51.100.2:51820\npersistent_keepalive_interval=0\n"
        f"public_key={to_hex(K3)}\nendpoint=192.0.2.13:51820\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=10.77.0.3/32\n"
        "\n"
    )


def test_update_of_allowed_ips_replaces_them_only() -> None:
    p = Peer(K2, "192.0.2.2:51820", ("10.77.0.2/32", "10.200.0.0/16"), 25)
    text = uapi.encode_plan(Plan(updates=(PeerUpdate(p, frozenset({"allowed_ips"})),))).decode()
    assert "endpoint=" not in text and "persistent_keepalive_interval" not in text
    assert "update_only=true\nreplace_allowed_ips=true\nallowed_ip=10.77.0.2/32\nallowed_ip=10.200.0.0/16\n" in text


def test_encode_device() -> None:
    assert uapi.encode_device(private_key_hex="ab" * 32, listen_port=51820) == (
        b"set=1\nprivate_key=" + b"ab" * 32 + b"\nlisten_port=51820\n\n")
    assert uapi.encode_device(listen_port=1) == b"set=1\nlisten_port=1\n\n"

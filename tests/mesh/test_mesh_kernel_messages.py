"""Kernel backend message building, checked through pyroute2's own netlink encoder and decoder
(no wireguard module needed: messages are encoded to bytes and decoded back)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE, AsyncWireGuard, wgmsg

from regional_gateway.wireguard import backend as backend_mod
from regional_gateway.wireguard import selection
from regional_gateway.wireguard.kernel import device_from_netlink, device_request, netlink_requests
from regional_gateway.wireguard.keys import PrivateKey
from regional_gateway.wireguard.peers import Peer, PeerUpdate, Plan

K1 = base64.b64encode(bytes([1]) * 32).decode()
K2 = base64.b64encode(bytes([2]) * 32).decode()
K3 = base64.b64encode(bytes([3]) * 32).decode()
WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS, WGPEER_F_UPDATE_ONLY = 1, 2, 4


def encode_set(ifname: str, kwargs: dict[str, Any]) -> bytes:
    """What pyroute2's WireGuard.set would send for these kwargs (its own builder, no socket)."""
    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    builder = object.__new__(AsyncWireGuard)
    if "private_key" in kwargs:
        builder._wg_test_key(kwargs["private_key"])
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", kwargs["private_key"]])
    if "listen_port" in kwargs:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", kwargs["listen_port"]])
    if "peer" in kwargs:
        builder._wg_set_peer(msg, kwargs["peer"])
    msg["header"]["type"] = 0x20
    msg.encode()
    return bytes(msg.data)


def decode(data: bytes) -> Any:
    msg = wgmsg(data)
    msg.decode()
    return msg


def peer_attrs(data: bytes) -> Any:
    (peer,) = decode(data).get_attr("WGDEVICE_A_PEERS")
    return peer


def test_plan_becomes_calls_removes_first() -> None:
    plan = Plan(
        adds=(Peer(K3, "192.0.2.13:51820", ("10.77.0.3/32", "10.200.3.0/24"), 25),),
        updates=(PeerUpdate(Peer(K2, "[2001:db8::2]:51821", ("10.77.0.2/32",)), frozenset({"endpoint"})),),
        removes=(K1,),
    )
    calls = netlink_requests(plan)
    assert [c["peer"]["public_key"] for c in calls] == [K1, K2, K3]

    removed = peer_attrs(encode_set("gm0", calls[0]))
    assert removed.get_attr("WGPEER_A_PUBLIC_KEY").decode() == K1
    assert removed.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert removed.get_attr("WGPEER_A_ALLOWEDIPS") is None

    updated = peer_attrs(encode_set("gm0", calls[1]))
    assert updated.get_attr("WGPEER_A_FLAGS") == WGPEER_F_UPDATE_ONLY
    assert updated.get_attr("WGPEER_A_ENDPOINT")["addr"] == "2001:db8::2"
    assert updated.get_attr("WGPEER_A_ENDPOINT")["port"] == 51821
    assert updated.get_attr("WGPEER_A_ALLOWEDIPS") is None  # only the endpoint changed
    assert updated.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") is None

    added = peer_attrs(encode_set("gm0", calls[2]))
    assert added.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert added.get_attr("WGPEER_A_ENDPOINT")["addr"] == "192.0.2.13"
    assert added.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    assert [a["addr"] for a in added.get_attr("WGPEER_A_ALLOWEDIPS")] == ["10.77.0.3/32", "10.200.3.0/24"]


def test_keepalive_switched_off_is_sent_as_zero() -> None:
    (call,) = netlink_requests(Plan(updates=(PeerUpdate(Peer(K1), frozenset({"persistent_keepalive"})),)))
    assert peer_attrs(encode_set("gm0", call)).get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0


def test_empty_plan_is_no_call() -> None:
    assert netlink_requests(Plan()) == []


def test_device_request_round_trips() -> None:
    key = PrivateKey.generate()
    msg = decode(encode_set("gm0", device_request(key, 51820)))
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY").decode() == key.secret_base64()
    assert msg.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820
    assert device_request(None, None) == {}


def get_reply(private_key: str, peers: list[list[Any]]) -> Any:
    """A WG_CMD_GET_DEVICE reply as the kernel would send it, through pyroute2's encoder/decoder."""
    msg = wgmsg()
    msg["cmd"] = WG_CMD_GET_DEVICE
    msg["version"] = 1
    msg["attrs"] = [["WGDEVICE_A_IFNAME", "gm0"], ["WGDEVICE_A_PRIVATE_KEY", private_key],
                    ["WGDEVICE_A_LISTEN_PORT", 51820], ["WGDEVICE_A_PEERS", [{"attrs": p} for p in peers]]]
    msg["header"]["type"] = 0x20
    msg.encode()
    return decode(bytes(msg.data))


def allowed(*cidrs: str) -> list[dict[str, Any]]:
    import socket

    out = []
    for c in cidrs:
        addr, mask = c.split("/")
        out.append({"attrs": [["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
                              ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(socket.AF_INET, addr)],
                              ["WGALLOWEDIP_A_CIDR_MASK", int(mask)]]})
    return out


def test_device_from_netlink_reads_peers_handshakes_and_merges_multipart() -> None:
    key = PrivateKey.generate()
    part1 = get_reply(key.secret_base64(), [
        [["WGPEER_A_PUBLIC_KEY", K1], ["WGPEER_A_ENDPOINT", {"addr": "192.0.2.11", "port": 51820}],
         ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
         ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 500000000}],
         ["WGPEER_A_RX_BYTES", 1036], ["WGPEER_A_TX_BYTES", 1184],
         ["WGPEER_A_ALLOWEDIPS", allowed("10.77.0.1/32")]],
    ])
    # the kernel continues a peer with many allowed IPs in the next part of the dump
    part2 = get_reply(key.secret_base64(), [
        [["WGPEER_A_PUBLIC_KEY", K1], ["WGPEER_A_ALLOWEDIPS", allowed("10.200.1.0/24")]],
        [["WGPEER_A_PUBLIC_KEY", K2], ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}]],
    ])
    dev = device_from_netlink([part1, part2])
    assert dev.private_key == key.secret_base64() and dev.listen_port == 51820
    p1, p2 = dev.peers[K1], dev.peers[K2]
    assert p1 == Peer(K1, "192.0.2.11:51820", ("10.77.0.1/32", "10.200.1.0/24"), 25)
    assert p1.last_handshake == pytest.approx(1700000000.5) and (p1.rx_bytes, p1.tx_bytes) == (1036, 1184)
    assert p2.last_handshake is None and p2.endpoint is None


def test_select_backend_auto_and_override(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from regional_gateway.wireguard.kernel import KernelBackend
    from regional_gateway.wireguard.userspace import UserspaceBackend

    assert selection.kernel_available(tmp_path / "absent") is False
    monkeypatch.setattr(selection, "kernel_available", lambda: True)
    assert isinstance(selection.select_backend("auto"), KernelBackend)
    assert isinstance(selection.select_backend("userspace", wireguard_go="/bin/true"), UserspaceBackend)
    monkeypatch.setattr(selection, "kernel_available", lambda: False)
    assert isinstance(selection.select_backend("auto", wireguard_go="/bin/true"), UserspaceBackend)
    with pytest.raises(backend_mod.WireGuardError, match="module is not loaded"):
        selection.select_backend("kernel")
    with pytest.raises(backend_mod.ValidationError):
        selection.select_backend("bogus")  # type: ignore[arg-type]

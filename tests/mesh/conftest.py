"""Fixtures for the mesh tests: network-namespace topologies and wireguard-go availability.

`needs_netns` / `needs_wireguard_go`  skip markers with the reason (not root, no iproute2, no
                                      wireguard-go, no /dev/net/tun); CI runs as root with them.
`topology`        (tests/conftest.py) a started `geomesh.lab.netns.Topology`, checked for leftovers.
`wireguard_go`    the path of the wireguard-go binary.
"""

from __future__ import annotations

import os
import shutil

import pytest

from geomesh.lab import netns

_NETNS_REASON = netns.unavailable_reason()
_WG = shutil.which("wireguard-go")
_WG_REASON = (
    _NETNS_REASON
    or (None if _WG else "wireguard-go is not installed (scripts/install.sh installs it)")
    or (None if os.path.exists("/dev/net/tun") else "no /dev/net/tun for wireguard-go")
)

needs_netns = pytest.mark.skipif(_NETNS_REASON is not None, reason=_NETNS_REASON or "")
needs_wireguard_go = pytest.mark.skipif(_WG_REASON is not None, reason=_WG_REASON or "")


@pytest.fixture(scope="session", autouse=True)
def _sweep_crashed_topologies() -> None:
    """Remove topologies left by crashed earlier runs (only those whose owner process is dead)."""
    if _NETNS_REASON is None:
        netns.sweep()


@pytest.fixture
def wireguard_go() -> str:
    if _WG_REASON is not None:
        pytest.skip(_WG_REASON)
    assert _WG is not None
    return _WG

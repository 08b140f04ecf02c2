"""The choice between WireGuard implementations: kernel WireGuard when it is there, else wireguard-go.

`select_backend(kind)` returns a ready `WireGuardBackend`: `kernel` (generic netlink, `kernel.py`)
when asked for or, with `auto`, when the kernel module is loaded (`kernel_available`);
`userspace` (wireguard-go over its UAPI socket, `userspace.py`) otherwise. It lives apart from
the interface (`backend.py`) so that the interface never imports its own implementations: the
implementations import `backend`, and this module imports all three.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from geomesh.errors import ValidationError
from regional_gateway.wireguard.backend import BackendKind, WireGuardBackend, WireGuardError
from regional_gateway.wireguard.kernel import KernelBackend
from regional_gateway.wireguard.userspace import UserspaceBackend


def kernel_available(sys_module: Path = Path("/sys/module/wireguard")) -> bool:
    """Whether the WireGuard kernel module is loaded (or built in)."""
    return sys_module.exists()


def select_backend(kind: BackendKind = "auto", *, netns: str | None = None,
                   wireguard_go: str | None = None) -> WireGuardBackend:
    """The kernel backend when asked for or (auto) when the module is there, else wireguard-go."""
    if kind not in ("auto", "kernel", "userspace"):
        raise ValidationError("wg_backend", f"{kind!r} is not one of auto, kernel, userspace")
    if kind == "kernel" or (kind == "auto" and kernel_available()):
        if kind == "kernel" and not kernel_available():
            raise WireGuardError("kernel WireGuard requested but the wireguard module is not loaded")
        return KernelBackend(netns=netns)
    binary = wireguard_go or shutil.which("wireguard-go")
    if binary is None:
        raise WireGuardError("no WireGuard kernel module and no wireguard-go on PATH: install wireguard-go")
    return UserspaceBackend(binary=binary, netns=netns)

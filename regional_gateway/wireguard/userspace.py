"""Userspace WireGuard: a wireguard-go process per interface, configured over its UAPI socket.

`ensure_interface` starts `wireguard-go -f <ifname>` in the foreground (we keep the Popen, so we
own its PID; its output goes to a log file or nowhere, never to a pipe that could break when the
agent dies) in the current network namespace — or, given `netns`, inside that named namespace
through `ip netns exec`, which execs in place so the PID is still wireguard-go's. If a
wireguard-go already answers on the interface's socket and the interface is in our namespace,
the backend adopts it instead: an agent restart keeps the running tunnels and their peers.
UAPI sockets live in one global directory (/var/run/wireguard/<ifname>.sock), whatever the
network namespace, so interface names must be unique on the host. Addresses, link state and
routes go through pyroute2 (`links.py`); peers through one `set=1` transaction per plan.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from geomesh.logs import event
from regional_gateway.wireguard import links, uapi
from regional_gateway.wireguard.backend import WireGuardBackend, WireGuardError, check_interface_args
from regional_gateway.wireguard.keys import PrivateKey
from regional_gateway.wireguard.peers import Peer, Plan

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")


class UapiClient:
    """Blocking request/reply over one wireguard-go UAPI socket (a connection per request)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, data: bytes) -> bytes:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(data)
                buf = b""
                while not uapi.reply_complete(buf):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise WireGuardError(f"{self.path}: wireguard-go closed the connection mid-reply")
                    buf += chunk
                return buf
        except TimeoutError:
            raise WireGuardError(f"{self.path}: no reply from wireguard-go within {self.timeout}s") from None
        except OSError as e:
            raise WireGuardError(f"{self.path}: {e.strerror or e}") from None

    def get(self) -> uapi.DeviceState:
        return uapi.parse_get(self.request(uapi.encode_get()))

    def set(self, transaction: bytes) -> None:
        if transaction:
            uapi.check_errno(self.request(transaction).decode("ascii", "replace"))

    def alive(self) -> bool:
        try:
            self.request(uapi.encode_get())
            return True
        except (WireGuardError, uapi.UapiError):
            return False


class UserspaceBackend(WireGuardBackend):
    """wireguard-go through its UAPI socket."""

    kind = "userspace"

    def __init__(self, *, binary: str = "wireguard-go", netns: str | None = None,
                 socket_dir: Path = SOCKET_DIR, log_path: Path | None = None,
                 start_timeout: float = 10.0) -> None:
        super().__init__(netns=netns)
        self.binary = binary
        self.socket_dir = Path(socket_dir)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.adopted = False
        self._uapi: UapiClient | None = None

    # --- properties -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the wireguard-go we started (None if adopted or not started)."""
        return self.process.pid if self.process is not None else None

    def socket_path(self, name: str) -> Path:
        return self.socket_dir / f"{name}.sock"

    # --- lifecycle --------------------------------------------------------------------------

    def _client(self) -> UapiClient:
        if self._uapi is None:
            raise WireGuardError("ensure_interface() has not been called")
        return self._uapi

    def _start(self, name: str, client: UapiClient, ipr: Any) -> int:
        argv = [self.binary, "-f", name]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error" if self.log_path is None else "verbose")
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, close_fds=True)
        except OSError as e:
            raise WireGuardError(f"cannot start {self.binary}: {e.strerror or e}") from None
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.process = None
                hint = f" (log: {self.log_path})" if self.log_path else ""
                raise WireGuardError(f"wireguard-go for {name} exited with status {code} at start{hint}")
            index = links.link_index(ipr, name)
            if index is not None and client.alive():
                return index
            if time.monotonic() > deadline:
                self._stop_process()
                raise WireGuardError(f"wireguard-go for {name} did not come up within {self.start_timeout}s")
            time.sleep(0.02)

    def ensure_interface(self, name: str, private_key: PrivateKey, listen_port: int, address_cidr: str) -> None:
        check_interface_args(name, listen_port, address_cidr)
        if self._name is not None and self._name != name:
            raise WireGuardError(f"this backend already manages {self._name}")
        links.off_event_loop("ensure_interface")
        client = UapiClient(self.socket_path(name))
        with links.iproute(self.netns) as ipr:
            index = links.link_index(ipr, name)
            if self.process is not None and self.process.poll() is None:
                alive = True  # ours, already running
            else:
                alive = client.alive()
            if alive and index is None:
                raise WireGuardError(
                    f"{name}: a wireguard-go answers on {client.path} but the interface is not in this network "
                    "namespace; UAPI sockets are global, so interface names must be unique on the host"
                )
            if not alive and index is not None:
                raise WireGuardError(f"{name}: an interface with this name exists but no wireguard-go answers "
                                     f"on {client.path}")
            self.adopted = alive and self.process is None
            if not alive:
                index = self._start(name, client, ipr)
            assert index is not None
            self._uapi = client
            self._name = name
            state = client.get()
            secret = private_key.secret_hex()
            need_key, need_port = state.private_key_hex != secret, state.listen_port != listen_port
            if need_key or need_port:
                client.set(uapi.encode_device(private_key_hex=secret if need_key else None,
                                              listen_port=listen_port if need_port else None))
            self._public_key = private_key.public_key
            self._address = address_cidr
            links.ensure_address(ipr, index, address_cidr)
            links.set_up(ipr, index)
            self._sync_routes(state.peers, ipr)
        event(log, "wireguard interface ready", interface=name, backend=self.kind, public_key=self._public_key,
              listen_port=listen_port, address=address_cidr, adopted=self.adopted, pid=self.pid,
              peers=len(state.peers), netns=self.netns)

    def _sync_routes(self, peers: dict[str, Peer], ipr: Any) -> None:
        assert self._name is not None and self._address is not None
        index = links.link_index(ipr, self._name)
        if index is None:
            raise WireGuardError(f"{self._name}: interface vanished")
        wanted = links.routes_needed(self._address, [net for p in peers.values() for net in p.allowed_ips])
        links.sync_routes(ipr, index, wanted)

    def peers(self) -> dict[str, Peer]:
        return self._client().get().peers

    def device(self) -> uapi.DeviceState:
        return self._client().get()

    def apply(self, plan: Plan) -> None:
        if plan.empty:
            return
        client = self._client()
        try:
            client.set(uapi.encode_plan(plan))
        except uapi.UapiError as e:
            raise WireGuardError(f"{self._name}: {e}") from None
        if plan.touches_allowed_ips:
            with links.iproute(self.netns) as ipr:
                self._sync_routes(client.get().peers, ipr)

    def _stop_process(self, timeout: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def close(self, *, remove_interface: bool = False) -> None:
        if not remove_interface or self._name is None:
            return  # nothing held between calls; the interface and its wireguard-go stay up
        name = self._name
        if self.process is not None:
            self._stop_process()  # wireguard-go removes its tun and socket on SIGTERM
            sock = self.socket_path(name)
            if sock.exists() and not UapiClient(sock, timeout=1.0).alive():
                sock.unlink(missing_ok=True)  # left behind by a wireguard-go that was killed
        else:
            with links.iproute(self.netns) as ipr:
                index = links.link_index(ipr, name)
                if index is not None:
                    ipr.link("del", index=index)  # an adopted wireguard-go exits when its tun goes
            deadline = time.monotonic() + 5.0
            while self.socket_path(name).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._uapi = None
        self._name = None
        event(log, "wireguard interface removed", interface=name)

"""The wireguard-go UAPI text protocol, as pure functions (bytes in, values out; no socket).

A request is `get=1` or `set=1` followed by `key=value` lines and a blank line; the reply to a
get is the device's `key=value` lines, and every reply ends with `errno=N` and a blank line (0 is
success, otherwise a negated errno). Keys travel in hex. Peer sections start at `public_key=`.
`encode_plan` writes a whole `Plan` as one `set=1` transaction that names only the peers that
change; `parse_get` turns a get reply into the device's settings and its `Peer`s with their last
handshake and byte counters. See https://www.wireguard.com/xplatform/ for the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from geomesh.errors import GeomeshError, ValidationError
from regional_gateway.wireguard.keys import from_hex, to_hex
from regional_gateway.wireguard.peers import Peer, Plan


class UapiError(GeomeshError):
    """wireguard-go refused a request (`errno` is the positive errno) or replied garbage."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What a get returns. `private_key_hex` stays in here, never in a log line."""

    private_key_hex: str = field(default="", repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[str, Peer] = field(default_factory=dict)


def encode_get() -> bytes:
    return b"get=1\n\n"


def encode_device(*, private_key_hex: str | None = None, listen_port: int | None = None) -> bytes:
    """A set transaction for the device-level settings."""
    lines = ["set=1"]
    if private_key_hex is not None:
        if len(private_key_hex) != 64:
            raise ValidationError("private_key", "expected 32 bytes of hex")
        bytes.fromhex(private_key_hex)
        lines.append(f"private_key={private_key_hex}")
    if listen_port is not None:
        if not 0 <= listen_port <= 65535:
            raise ValidationError("listen_port", f"{listen_port} is not 0..65535")
        lines.append(f"listen_port={listen_port}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _peer_lines(peer: Peer, changed: frozenset[str] | None) -> list[str]:
    """Lines for one added (changed=None) or updated peer."""
    lines = [f"public_key={to_hex(peer.public_key)}"]
    if changed is not None:
        lines.append("update_only=true")
    if (changed is None or "endpoint" in changed) and peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}")
    if changed is None:
        if peer.persistent_keepalive:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
    elif "persistent_keepalive" in changed:
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
    if changed is None or "allowed_ips" in changed:
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return lines


def encode_plan(plan: Plan) -> bytes:
    """One `set=1` transaction applying `plan`; b"" for an empty plan (nothing to send).

    Removes go first, then updates, then adds."""
    if plan.empty:
        return b""
    lines = ["set=1"]
    for key in plan.removes:
        lines += [f"public_key={to_hex(key)}", "remove=true"]
    for update in plan.updates:
        lines += _peer_lines(update.peer, update.changed)
    for peer in plan.adds:
        lines += _peer_lines(peer, None)
    return ("\n".join(lines) + "\n\n").encode("ascii")


def reply_complete(buf: bytes) -> bool:
    """Whether `buf` holds a whole reply (the `errno=` line and the blank line after it)."""
    return buf.endswith(b"\n\n") and (buf.startswith(b"errno=") or b"\nerrno=" in buf)


def check_errno(text: str) -> None:
    """Raise UapiError unless the reply's errno line says 0."""
    for line in text.split("\n"):
        if line.startswith("errno="):
            try:
                code = int(line[6:])
            except ValueError:
                raise UapiError(f"malformed errno line {line!r}") from None
            if code != 0:
                raise UapiError(f"wireguard-go refused the request: errno={code}", abs(code))
            return
    raise UapiError("reply has no errno line")


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UapiError(f"{key}={value!r} is not an integer") from None


def parse_get(reply: bytes | str) -> DeviceState:
    """The device described by a get reply (UapiError on errno != 0 or a malformed line)."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    check_errno(text)
    device: dict[str, object] = {"private_key_hex": "", "listen_port": 0, "fwmark": 0}
    peers: dict[str, Peer] = {}
    current: dict[str, object] | None = None

    def finish() -> None:
        if current is None:
            return
        sec, nsec = int(current.pop("sec", 0)), int(current.pop("nsec", 0))  # type: ignore[call-overload]
        current["last_handshake"] = None if sec == 0 and nsec == 0 else sec + nsec / 1e9
        try:
            peer = Peer(**current)  # type: ignore[arg-type]
        except ValidationError as e:
            raise UapiError(f"wireguard-go reported an invalid peer: {e}") from None
        peers[peer.public_key] = peer

    for line in text.split("\n"):
        if not line or line.startswith("errno="):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"malformed line {line!r}")
        if key == "public_key":
            finish()
            try:
                current = {"public_key": from_hex(value), "allowed_ips": []}
            except ValidationError:
                raise UapiError(f"malformed public key {value!r}") from None
        elif current is None:
            if key == "private_key":
                device["private_key_hex"] = value
            elif key in ("listen_port", "fwmark"):
                device[key] = _int(key, value)
        elif key == "endpoint":
            current["endpoint"] = value
        elif key == "allowed_ip":
            current["allowed_ips"].append(value)  # type: ignore[union-attr]
        elif key == "persistent_keepalive_interval":
            current["persistent_keepalive"] = _int(key, value)
        elif key == "last_handshake_time_sec":
            current["sec"] = _int(key, value)
        elif key == "last_handshake_time_nsec":
            current["nsec"] = _int(key, value)
        elif key in ("rx_bytes", "tx_bytes"):
            current[key] = _int(key, value)
        # preshared_key, protocol_version and future keys: not ours to manage
    finish()
    return DeviceState(
        private_key_hex=str(device["private_key_hex"]),
        listen_port=int(device["listen_port"]),  # type: ignore[call-overload]
        fwmark=int(device["fwmark"]),  # type: ignore[call-overload]
        peers=peers,
    )

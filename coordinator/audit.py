"""The audit log of writes: one JSON line per write call, naming who made it.

Every Admin and GatewayControl call that writes (`unary(..., write=True)`) is logged, accepted or
refused, on the `geomesh.audit` logger: the caller's role, name and certificate serial, the
method, the request's key fields (names, region, addresses; each value cut at 128 characters)
and the resulting status code. The line goes to the process log (JSON by default) and, with
`--audit-log PATH`, appended to that file as JSON whatever the log format. Accepted writes are
counted in `geomesh_coordinator_writes_total{method,role}`; refused ones are in
`geomesh_coordinator_requests_total{method,code}` like every call. Writes the coordinator makes
on its own (liveness, heartbeat health, votes, reachability) are not audit lines: they are
counted by their own metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from google.protobuf.message import Message
from prometheus_client import Counter

from geomesh.logs import JsonFormatter

log = logging.getLogger("geomesh.audit")

WRITES = Counter("geomesh_coordinator_writes_total", "accepted write calls (each one an audit line)",
                 ["method", "role"])
KEY_FIELDS = ("name", "app", "id", "region", "fqdn", "serial", "role", "public_ip", "public_ipv6", "public_ips",
              "address", "port", "expected_revision")
MAX_VALUE = 128


def key_fields(request: object) -> dict[str, object]:
    """The fields that say what a write touched, from its request (one level of nesting, so
    UpdateApp's `app.name` is there); long values are cut."""
    if not isinstance(request, Message):
        return {}
    out: dict[str, object] = {}
    for desc, value in request.ListFields():
        if isinstance(value, Message):
            for sub, sub_value in value.ListFields():
                if sub.name in KEY_FIELDS:
                    out[f"{desc.name}.{sub.name}"] = _cut(sub_value)
        elif desc.name in KEY_FIELDS:
            out[desc.name] = _cut(value)
    return out


def _cut(value: object) -> object:
    if isinstance(value, str):
        return value[:MAX_VALUE]
    if isinstance(value, (int, float, bool)):
        return value
    return [_cut(v) for v in list(value)[:16]]  # type: ignore[call-overload]


def record(role: str, name: str, serial: str, method: str, request: object, code: grpc.StatusCode) -> None:
    """Log one write call; count it when it was accepted."""
    if code == grpc.StatusCode.OK:
        WRITES.labels(method, role).inc()
    try:
        fields = key_fields(request)
    except Exception:  # noqa: BLE001 - the line is written anyway, without the request's fields
        fields = {"unreadable": True}
    log.info("write", extra={"fields": {"audit": True, "method": method, "role": role, "caller": name,
                                        "serial": serial, "code": code.name, "request": fields}})


def add_file(path: Path) -> logging.Handler:
    """Also append every audit line to `path`, as JSON."""
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler

"""Who may call, and for how long: identity, revocation, enrollment, and the open streams.

One `Access` per coordinator. `identify` names the caller from its client certificate (checked
against the CA's constraints: `geomesh.pki.check_client_cert`) or, in --insecure mode, from the
x-geomesh-identity header, and refuses a revoked caller (UNAUTHENTICATED); `permit` checks the
role. Every stream registers itself while it runs (`open_stream`); a gateway session also binds
its gateway and the enrollment revision it started under (`bind_session`).

`run` follows the cache: whenever `revoked/` or `enrollments/` changes, every open stream is
judged again (`verdict`, pure) and ended when its caller is revoked (UNAUTHENTICATED), its
gateway no longer enrolled (PERMISSION_DENIED), or enrolled again so that its record no longer
fits (NOT_FOUND: register again). The end is sent from the loop even if the handler is blocked in
a send. Every replica does this from its own cache, within moments of the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from cryptography import x509
from prometheus_client import Counter

from coordinator import audit
from coordinator.enrollment import Enrollments, fits
from coordinator.revocation import Revocations, RevocationSet
from coordinator.rpc_common import Caller, identify
from coordinator.state import State
from geomesh.errors import PermissionDeniedError, UnauthenticatedError

log = logging.getLogger("geomesh.coordinator.access")

REFUSED = Counter("geomesh_coordinator_refused_callers_total",
                  "calls refused before the method ran (revoked, bad_certificate, role)", ["reason"])
STREAMS_ENDED = Counter("geomesh_coordinator_streams_ended_total",
                        "open streams ended because their caller lost access (revoked, unenrolled, reenrolled)",
                        ["reason"])


@dataclass(slots=True)
class OpenStream:
    caller: Caller
    method: str
    context: grpc.aio.ServicerContext
    handler: asyncio.Task
    gateway: str = ""          # a gateway session: its gateway
    enrollment_rev: int = 0    # and the enrollment revision it started under
    ended: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: str  # the metric label
    code: grpc.StatusCode
    details: str


def verdict(stream: OpenStream, revoked: RevocationSet, enrollment_of, record_of) -> Verdict | None:  # noqa: ANN001
    """Whether an open stream must end now (None: it goes on). Pure over its inputs:
    `enrollment_of(name)` and `record_of(name)` read the cache."""
    why = revoked.refuses(stream.caller.role, stream.caller.name, stream.caller.serial)
    if why is not None:
        return Verdict("revoked", grpc.StatusCode.UNAUTHENTICATED, why)
    if not stream.gateway:
        return None
    enrollment = enrollment_of(stream.gateway)
    if enrollment is None:
        return Verdict("unenrolled", grpc.StatusCode.PERMISSION_DENIED,
                       f"gateway {stream.gateway!r} is no longer enrolled")
    if enrollment.mod_revision != stream.enrollment_rev:
        record = record_of(stream.gateway)
        if record is None or not fits(enrollment, record):
            return Verdict("reenrolled", grpc.StatusCode.NOT_FOUND,
                           f"gateway {stream.gateway!r} was enrolled again (region {enrollment.region}): "
                           "register again")
    return None


class Access:
    def __init__(self, state: State, *, insecure: bool, ca: x509.Certificate | None) -> None:
        self.state = state
        self.insecure = insecure
        self.ca = ca
        self.enrollments = Enrollments(state)
        self.revocations = Revocations(state)
        self._streams: dict[asyncio.Task, OpenStream] = {}
        audit.log.setLevel(logging.INFO)  # audit lines whatever --log-level

    # -- per call ------------------------------------------------------------------------------

    def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        try:
            caller = identify(context, self.insecure, self.ca)
        except UnauthenticatedError:
            REFUSED.labels("bad_certificate").inc()
            raise
        why = self.revocations.current().refuses(caller.role, caller.name, caller.serial)
        if why is not None:
            REFUSED.labels("revoked").inc()
            raise UnauthenticatedError(why)
        return caller

    def permit(self, caller: Caller, roles: tuple[str, ...], method: str) -> None:
        if caller.role not in roles:
            REFUSED.labels("role").inc()
            raise PermissionDeniedError(f"role {caller.role!r} may not call {method} (allowed: {', '.join(roles)})")

    def audit(self, caller: Caller, method: str, request: object, code: grpc.StatusCode) -> None:
        audit.record(caller.role, caller.name, caller.serial, method, request, code)

    # -- open streams --------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_stream(self, caller: Caller, method: str, context: grpc.aio.ServicerContext) -> Iterator[OpenStream]:
        task = asyncio.current_task()
        assert task is not None
        entry = OpenStream(caller, method, context, task)
        self._streams[task] = entry
        try:
            yield entry
        finally:
            if self._streams.get(task) is entry:
                del self._streams[task]

    def bind_session(self, gateway: str, enrollment_rev: int) -> None:
        """The current stream is `gateway`'s session, started under that enrollment revision."""
        task = asyncio.current_task()
        entry = self._streams.get(task) if task is not None else None
        if entry is not None:
            entry.gateway, entry.enrollment_rev = gateway, enrollment_rev

    def open_streams(self) -> list[OpenStream]:
        return list(self._streams.values())

    def sweep(self) -> int:
        """End every open stream whose caller lost access; returns how many."""
        revoked = self.revocations.current()
        ended = 0
        for entry in list(self._streams.values()):
            if entry.ended:
                continue
            v = verdict(entry, revoked, self.enrollments.get, self.state.gateways.get)
            if v is None:
                continue
            entry.ended = True
            ended += 1
            STREAMS_ENDED.labels(v.reason).inc()
            log.warning("stream ended: the caller lost access", extra={"fields": {
                "method": entry.method, "caller": f"{entry.caller.role}/{entry.caller.name}",
                "serial": entry.caller.serial, "reason": v.reason}})
            end_stream(entry.handler, entry.context, v.code, v.details)
        return ended

    async def run(self) -> None:
        """Judge the open streams again whenever revocations or enrollments change."""
        seen = (-1, -1)
        while True:
            now = (self.state.dir_revision.get("revoked", 0), self.state.dir_revision.get("enrollments", 0))
            if now != seen:
                seen = now
                self.sweep()
            await asyncio.shield(self.state.changed())


def end_stream(handler: asyncio.Task, context: grpc.aio.ServicerContext, code: grpc.StatusCode,
               details: str) -> asyncio.Task:
    """End a stream from outside its handler (which may be blocked in a send): queue its status
    and cancel the handler. The handler's own cleanup (a session's liveness) runs on the cancel.

    grpc's asyncio server cannot reset one stream: the status goes out behind a blocked message
    (a client that reads again gets the message, then this status), and grpc's copy of that
    message stays until then or until the client goes away."""
    async def send_status() -> None:
        with contextlib.suppress(Exception):  # AbortError once queued; ExecuteBatchError if the client left
            await context.abort(code, details)

    task = asyncio.get_running_loop().create_task(send_status())
    _STATUS_TASKS.add(task)
    task.add_done_callback(_STATUS_TASKS.discard)
    handler.cancel()
    return task


_STATUS_TASKS: set[asyncio.Task] = set()

"""What every coordinator RPC shares: who is calling, what they may do, how errors map to codes.

`unary(roles)` and `stream(roles)` wrap servicer methods: they identify the caller from the mTLS
certificate (role = OU, name = CN; in --insecure mode from the x-geomesh-identity header), refuse
roles not listed, map geomesh's typed errors to gRPC status codes in this one place, and record
request count and latency per method and code.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Histogram

from geomesh.channel import INSECURE_IDENTITY_HEADER
from geomesh.errors import (
    AlreadyExistsError,
    ExhaustedError,
    GeomeshError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    StoreUnavailableError,
    UnauthenticatedError,
    ValidationError,
)
from geomesh.pki import ROLES, identity_of_pem

log = logging.getLogger("geomesh.coordinator.rpc")

REQUESTS = Counter("geomesh_coordinator_requests_total", "RPCs handled", ["method", "code"])
LATENCY = Histogram("geomesh_coordinator_request_seconds", "RPC latency (unary) or stream lifetime",
                    ["method"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10))

CODE_OF: dict[type[GeomeshError], grpc.StatusCode] = {
    ValidationError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    StoreUnavailableError: grpc.StatusCode.UNAVAILABLE,
    ExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True, slots=True)
class Caller:
    role: str
    name: str

    def require_gateway(self, name: str, what: str = "gateway") -> None:
        """A gateway identity may act only on itself."""
        if self.role == "gateway" and self.name != name:
            raise PermissionDeniedError(f"gateway {self.name!r} may not change {what} {name!r}")


def identify(context: grpc.aio.ServicerContext, insecure: bool) -> Caller:
    if insecure:
        for k, v in context.invocation_metadata() or ():
            if k == INSECURE_IDENTITY_HEADER:
                role, _, name = str(v).partition("/")
                if role not in ROLES or not name:
                    raise UnauthenticatedError(f"{INSECURE_IDENTITY_HEADER} must be '<role>/<name>'")
                return Caller(role, name)
        return Caller("admin", "admin")
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise UnauthenticatedError("no client certificate: this port requires mTLS")
    return _caller_of_pem(pems[0])


@functools.lru_cache(maxsize=4096)
def _caller_of_pem(pem: bytes) -> Caller:
    """Parsing a certificate costs ~100 µs: each distinct verified certificate is parsed once."""
    role, name = identity_of_pem(pem)
    return Caller(role, name)


def _code(exc: GeomeshError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODE_OF:
            return CODE_OF[cls]
    return grpc.StatusCode.INTERNAL


def authorise(context: grpc.aio.ServicerContext, insecure: bool, roles: tuple[str, ...], method: str) -> Caller:
    """Who is calling, refused unless their role may call `method`."""
    caller = identify(context, insecure)
    if caller.role not in roles:
        raise PermissionDeniedError(f"role {caller.role!r} may not call {method} (allowed: {', '.join(roles)})")
    return caller


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> grpc.StatusCode:
    """End the RPC for `exc` with its mapped code; an unexpected error becomes INTERNAL and is logged."""
    if isinstance(exc, GeomeshError):
        code = _code(exc)
        await context.abort(code, str(exc))
    if context.code() not in (None, grpc.StatusCode.OK):  # already aborted (context.abort raises)
        raise exc
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
    return grpc.StatusCode.INTERNAL  # not reached: abort raises


def _observe(method: str, code: grpc.StatusCode, start: float) -> None:
    REQUESTS.labels(method, code.name).inc()
    LATENCY.labels(method).observe(time.perf_counter() - start)


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(exc, GeomeshError):
        return _code(exc)
    code = context.code()
    return code if code not in (None, grpc.StatusCode.OK) else grpc.StatusCode.INTERNAL


def unary(*roles: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        method = fn.__name__

        @functools.wraps(fn)
        async def handler(self, request, context):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                caller = authorise(context, self.insecure, roles, method)
                return await fn(self, request, context, caller)
            except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
                code = _code_of(exc, context)
                await _abort(context, exc, method)
            finally:
                _observe(method, code, start)

        return handler

    return wrap


def stream(*roles: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        method = fn.__name__

        @functools.wraps(fn)
        async def handler(self, request, context):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                caller = authorise(context, self.insecure, roles, method)
                async for item in fn(self, request, context, caller):
                    yield item
            except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
                code = _code_of(exc, context)
                await _abort(context, exc, method)
            finally:
                _observe(method, code, start)

        return handler

    return wrap

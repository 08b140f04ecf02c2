"""What every coordinator RPC shares: who is calling, what they may do, how errors map to codes.

`unary(roles)` and `stream(roles)` wrap servicer methods: they identify the caller through the
servicer's `access` (`coordinator.access`: the mTLS certificate, role = OU, name = CN, checked
against the CA's constraints and the revocations; in --insecure mode the x-geomesh-identity
header), refuse roles not listed, map geomesh's typed errors to gRPC status codes in this one
place, and record request count and latency per method and code. A `unary(..., write=True)`
method is a write: each call is an audit line (`coordinator.audit`).

Requests are decoded by `add_service`'s handlers, whose deserializer never raises: a body that is
not the method's protobuf becomes a `Malformed` value the wrappers (and the session's reader)
answer with INVALID_ARGUMENT, instead of grpc's UNKNOWN "Unexpected DecodeError" (probe finding
22). etcd refusing a request as too large is INVALID_ARGUMENT naming etcd's limit. grpc's own
error-level traceback for a client that left a stream while a message was being sent
(ExecuteBatchError) is a normal end of a stream: `ClientGoneFilter` logs it at debug and counts it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError, Message
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
from geomesh.pki import ROLES, check_client_cert

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


ETCD_TOO_LARGE = ("request: the write is larger than etcd accepts (etcd's --max-request-bytes, "
                  "1.5 MiB by default)")
CLIENT_GONE = Counter("geomesh_coordinator_streams_client_gone_total",
                      "streams whose client left while a message was being sent (grpc's ExecuteBatchError)")
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
MALFORMED = Counter("geomesh_coordinator_malformed_requests_total",
                    "request messages that were not the method's protobuf (INVALID_ARGUMENT)", ["method"])


@dataclass(frozen=True, slots=True)
class Caller:
    role: str
    name: str
    serial: str = ""  # the client certificate's serial in hex ("" in --insecure mode)

    def require_gateway(self, name: str, what: str = "gateway") -> None:
        """A gateway identity may act only on itself."""
        if self.role == "gateway" and self.name != name:
            raise PermissionDeniedError(f"gateway {self.name!r} may not change {what} {name!r}")


def identify(context: grpc.aio.ServicerContext, insecure: bool, ca: x509.Certificate | None = None) -> Caller:
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
    if ca is None:
        raise UnauthenticatedError("no CA to check client certificates against")
    return _caller_of_pem(pems[0], ca)


@functools.lru_cache(maxsize=4096)
def _caller_of_pem(pem: bytes, ca: x509.Certificate) -> Caller:
    """Checking a certificate costs ~100 µs: each distinct accepted certificate is checked once
    (a refused one is checked again on every call)."""
    cert = check_client_cert(pem, ca)
    return Caller(cert.role, cert.name, cert.serial)


class ClientGoneFilter(logging.Filter):
    """On grpc's core logger: an ExecuteBatchError (the client went away during a send) becomes a
    debug line without traceback, and is counted; everything else passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "ExecuteBatchError" not in record.getMessage() and not (
                record.exc_info and record.exc_info[0] is not None and record.exc_info[0].__name__ == "ExecuteBatchError"):
            return True
        CLIENT_GONE.inc()
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_client_gone() -> ClientGoneFilter:
    """Install `ClientGoneFilter` on grpc's core logger (idempotent)."""
    core = logging.getLogger(GRPC_CORE_LOGGER)
    for f in core.filters:
        if isinstance(f, ClientGoneFilter):
            return f
    f = ClientGoneFilter()
    core.addFilter(f)
    return f


class Malformed:
    """A request body that did not decode as the method's message (see `add_service`)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error

    def problem(self, method: str) -> ValidationError:
        MALFORMED.labels(method).inc()
        return ValidationError("request", f"not a valid {method} request message ({self.error[:120]})")


def safe_deserializer(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def decode(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return Malformed(str(exc) or type(exc).__name__)

    return decode


def add_service(server: grpc.aio.Server, servicer: object, descriptor, messages,  # noqa: ANN001
                serializers: Mapping[str, Callable] | None = None) -> None:
    """Register every method of the service `descriptor` (a ServiceDescriptor) on `server`,
    decoding requests with `safe_deserializer` (message classes looked up in the `messages`
    module by name); `serializers` overrides a method's response serializer."""
    handlers = {}
    for m in descriptor.methods:
        decode = safe_deserializer(getattr(messages, m.input_type.name))
        encode = (serializers or {}).get(m.name) or getattr(messages, m.output_type.name).SerializeToString
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=decode, response_serializer=encode)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)


def _code(exc: GeomeshError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODE_OF:
            return CODE_OF[cls]
    return grpc.StatusCode.INTERNAL


def translate(exc: BaseException) -> BaseException:
    """An etcd error the caller caused, as the geomesh error it is (else `exc` unchanged)."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                 grpc.StatusCode.INVALID_ARGUMENT):
        if "too large" in (exc.details() or "") or exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ValidationError("request", ETCD_TOO_LARGE.removeprefix("request: "))
    return exc


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> grpc.StatusCode:
    """End the RPC for `exc` with its mapped code; an unexpected error becomes INTERNAL and is logged."""
    exc = translate(exc)
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
    exc = translate(exc)
    if isinstance(exc, GeomeshError):
        return _code(exc)
    code = context.code()
    return code if code not in (None, grpc.StatusCode.OK) else grpc.StatusCode.INTERNAL


def unary(*roles: str, write: bool = False) -> Callable:
    def wrap(fn: Callable) -> Callable:
        method = fn.__name__

        @functools.wraps(fn)
        async def handler(self, request, context):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            caller: Caller | None = None
            try:
                caller = self.access.identify(context)
                self.access.permit(caller, roles, method)
                if isinstance(request, Malformed):
                    raise request.problem(method)
                return await fn(self, request, context, caller)
            except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
                code = _code_of(exc, context)
                await _abort(context, exc, method)
            finally:
                _observe(method, code, start)
                if write and caller is not None:
                    self.access.audit(caller, method, request, code)

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
                caller = self.access.identify(context)
                self.access.permit(caller, roles, method)
                if isinstance(request, Malformed):
                    raise request.problem(method)
                with self.access.open_stream(caller, method, context):
                    async for item in fn(self, request, context, caller):
                        yield item
            except Exception as exc:  # noqa: BLE001 - mapped to a status code in one place
                code = _code_of(exc, context)
                await _abort(context, exc, method)
            finally:
                _observe(method, code, start)

        return handler

    return wrap

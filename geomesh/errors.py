"""Typed errors shared by every geomesh process.

Each condition has one class; the gRPC servicers map them to status codes in exactly one place
(`coordinator.status`), DNS and HTTP code map their own. A message always names the field or
rule that was broken, so a caller can fix the request without reading our source.
"""

from __future__ import annotations


class GeomeshError(Exception):
    """Base class of every error geomesh raises on purpose."""


class ValidationError(GeomeshError):
    """A field of a request or config breaks a rule (-> INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFoundError(GeomeshError):
    """The named object does not exist (-> NOT_FOUND)."""


class AlreadyExistsError(GeomeshError):
    """An object with that name exists already (-> ALREADY_EXISTS)."""


class PreconditionError(GeomeshError):
    """The state does not allow the operation, e.g. a revision mismatch (-> FAILED_PRECONDITION)."""


class PermissionDeniedError(GeomeshError):
    """The caller's role or name does not allow this operation (-> PERMISSION_DENIED)."""


class UnauthenticatedError(GeomeshError):
    """The caller could not be identified (-> UNAUTHENTICATED)."""


class StoreUnavailableError(GeomeshError):
    """etcd did not answer in time; nothing was written (-> UNAVAILABLE)."""


class ExhaustedError(GeomeshError):
    """A pool (e.g. mesh addresses) has no free entry left (-> RESOURCE_EXHAUSTED)."""

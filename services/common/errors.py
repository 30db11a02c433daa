"""One exception hierarchy for every service; the server interceptor maps it to gRPC status codes.

Domain code raises these; it never touches grpc status codes itself. Anything that is not an LmeshError
(and not an upstream gRPC error) is a bug and becomes INTERNAL with a generic message and the trace id.
"""

from __future__ import annotations

import grpc


class LmeshError(Exception):
    """Base of every error a client may see; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class InvalidArgument(LmeshError):
    """A malformed or out-of-range field; the message always names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(LmeshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(LmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LmeshError):
    """A limit was hit; `retry_after_s` tells the client when trying again makes sense."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return (("retry-after-ms", str(int(self.retry_after_s * 1000))),)


class DeadlineExceeded(LmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LmeshError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(LmeshError):
    """A dependency is down or this process is draining; clients should retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


# Upstream status codes that keep their meaning when relayed to our own caller. INTERNAL and UNKNOWN are
# not relayed: they would leak another service's bug as ours, so they become a generic INTERNAL.
RELAYED_UPSTREAM_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
    }
)

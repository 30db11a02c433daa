"""One exception hierarchy for every service; the server interceptor maps it to gRPC status codes.

Domain code raises these; it never touches grpc status codes itself. Anything that is not an LmeshError
(and not an upstream gRPC error) is a bug and becomes INTERNAL with a generic message and the trace id.

Each error also says what a client reads without parsing its message: `details()`, the google.rpc detail messages
(ErrorInfo with a stable `reason`, and BadRequest, QuotaFailure or RetryInfo where they apply) that the interceptor
sends in a google.rpc.Status in the `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

ERROR_DOMAIN = "lmesh.dev"  # google.rpc.ErrorInfo.domain of every lmesh error
MAX_DETAIL_CHARS = 256  # a detail string that may echo the request (a field's problem, a model name) is cut here


class Reason(enum.StrEnum):
    """google.rpc.ErrorInfo.reason values: stable, documented in the protos and the README. An error with no
    specific reason carries its status code's name."""

    INVALID_FIELD = "INVALID_FIELD"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_NOT_SERVED = "MODEL_NOT_SERVED"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    # A model version an alias targets or an inference replica serves cannot be deleted.
    MODEL_IN_USE = "MODEL_IN_USE"
    # Mesh tools: a tool the caller's key was not granted, or one no passing service offers.
    TOOL_NOT_ALLOWED = "TOOL_NOT_ALLOWED"
    TOOL_NOT_FOUND = "TOOL_NOT_FOUND"
    CONTENT_BLOCKED = "CONTENT_BLOCKED"  # a guardrail rule with action `block` matched the request
    QUEUE_FULL = "QUEUE_FULL"
    # A queued inference request whose place a request of a higher priority took (the queue was full).
    SHED = "SHED"
    # Policy's limits: requests or tokens per minute (RATE_LIMITED), a key's or tenant's token budget.
    RATE_LIMITED = "RATE_LIMITED"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    # The gateway's own bound on concurrent chats (--max-chats) is reached: retry after the delay it gives.
    GATEWAY_BUSY = "GATEWAY_BUSY"
    # A client that took nothing of its stream for the gateway's --stalled-client-s: the stream was ended.
    CLIENT_STALLED = "CLIENT_STALLED"
    DRAINING = "DRAINING"
    DEPENDENCY_TIMEOUT = "DEPENDENCY_TIMEOUT"
    # An internal service refused the calling service itself (mTLS and Consul intentions), not its request.
    MESH_IDENTITY_REQUIRED = "MESH_IDENTITY_REQUIRED"
    MESH_DENIED = "MESH_DENIED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


def capped(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text`, cut to `limit` characters (with an ellipsis) when longer."""
    return text if len(text) <= limit else f"{text[:limit]}…"


def error_info(reason: str, metadata: Mapping[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN,
                                       metadata={k: capped(v) for k, v in (metadata or {}).items()})


def retry_info(retry_after_s: float) -> error_details_pb2.RetryInfo:
    """RetryInfo with the delay `retry-after-ms` carries (whole milliseconds, so both say the same)."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(retry_after_ms(retry_after_s))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def retry_after_ms(retry_after_s: float) -> int:
    return int(retry_after_s * 1000)


class LmeshError(Exception):
    """Base of every error a client may see; `code` is the gRPC status it maps to, `reason` the ErrorInfo reason
    it carries (the class's default unless given), `metadata` the ErrorInfo's metadata."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = Reason.INTERNAL

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None,
                 ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def details(self) -> list[Message]:
        """The google.rpc detail messages a client gets with this error: ErrorInfo first, then any the code has."""
        return [error_info(self.reason, self.metadata)]


class InvalidArgument(LmeshError):
    """A malformed or out-of-range field; the message always names the field, and so does a BadRequest detail."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_FIELD

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", metadata={"field": field})
        self.field = field
        self.problem = problem

    def details(self) -> list[Message]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=capped(self.field),
                                                                description=capped(self.problem))
        return [*super().details(), error_details_pb2.BadRequest(field_violations=[violation])]


class NotFound(LmeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.NOT_FOUND


class AlreadyExists(LmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = Reason.ALREADY_EXISTS


class FailedPrecondition(LmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.FAILED_PRECONDITION


class Unauthenticated(LmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED


class PermissionDenied(LmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = Reason.PERMISSION_DENIED


@dataclass(frozen=True)
class Limit:
    """The limit a ResourceExhausted hit, as google.rpc.QuotaFailure reports it: `id` names the kind of limit
    (stable: `inference.queue`; a policy limit names its own, e.g. `policy.requests_per_minute`), `subject` what
    it applies to (`model:<name:version>`, `key:<id>`, `tenant:<name>`), `value` its size when it has one."""

    id: str
    subject: str = ""
    value: int | None = None


class Retryable(LmeshError):
    """An error that may say when trying again makes sense: `retry_after_s`, sent both as the trailing metadata
    `retry-after-ms` and as a google.rpc.RetryInfo detail."""

    def __init__(self, message: str, retry_after_s: float | None = None, *, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        return (("retry-after-ms", str(retry_after_ms(self.retry_after_s))),)

    def details(self) -> list[Message]:
        details = super().details()
        if self.retry_after_s is not None:
            details.append(retry_info(self.retry_after_s))
        return details


class ResourceExhausted(Retryable):
    """A limit was hit: `limit` says which (a QuotaFailure detail, and `limit` in ErrorInfo's metadata);
    `retry_after_s` tells the client when trying again makes sense."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None, *, reason: str | None = None,
                 limit: Limit | None = None, metadata: Mapping[str, str] | None = None) -> None:
        merged = dict(metadata or {})
        if limit is not None:
            merged["limit"] = limit.id
        super().__init__(message, retry_after_s, reason=reason, metadata=merged)
        self.limit = limit

    def details(self) -> list[Message]:
        details = super().details()
        if self.limit is not None:
            violation = error_details_pb2.QuotaFailure.Violation(
                subject=capped(self.limit.subject), description=capped(self.message), quota_id=self.limit.id)
            if self.limit.value is not None:
                violation.quota_value = self.limit.value
            details.insert(1, error_details_pb2.QuotaFailure(violations=[violation]))
        return details


class DeadlineExceeded(LmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = Reason.DEADLINE_EXCEEDED


class Cancelled(LmeshError):
    code = grpc.StatusCode.CANCELLED
    reason = Reason.CANCELLED


class Unavailable(Retryable):
    """A dependency is down or this process is draining; clients should retry elsewhere or later (after
    `retry_after_s`, when given)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.UNAVAILABLE


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


def end_if_cancelled(exc: BaseException) -> None:
    """Raises CancelledError when the current task has been asked to stop. For a retry loop that caught `exc`: a
    cancellation can reach it disguised (a timeout that fired as the task was cancelled, a call cancelled under
    it), and retrying then would keep the task, and a process waiting for it at exit, alive."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc

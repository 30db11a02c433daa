"""The one server interceptor (span per RPC, error mapping, deadline capture, RPC metrics) and outgoing-call
helpers.

Servicers raise LmeshError subclasses; this module turns them into status codes. Upstream gRPC errors keep
their code when it is meaningful to our caller; anything else is INTERNAL with a generic message and the
trace id, and its traceback goes to the log only. Every error status also carries a google.rpc.Status in the
`grpc-status-details-bin` trailer (same code and message, plus the error's typed details; see `status_details`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.errors import (
    RELAYED_UPSTREAM_CODES,
    InvalidArgument,
    LmeshError,
    Reason,
    Unavailable,
    error_info,
    retry_info,
)
from services.common.telemetry import current_trace_id, extract_context, inject_metadata

log = logging.getLogger("lmesh.rpc")
RELAYED_TRAILERS = frozenset({"retry-after-ms"})
# The standard trailer of gRPC's rich error model: a serialized google.rpc.Status (grpc_status.rpc_status reads it).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Upstream details bigger than this are not relayed (its code's generic details are sent instead): the trailer
# must stay well inside HTTP/2 header limits whatever a peer sent.
MAX_RELAYED_DETAILS_BYTES = 2048
# What the status message (percent-encoded, as `grpc-message` carries it) and the details (base64) may take
# together: gRPC clients refuse trailers over 8 KiB by default (a "soft limit" they enforce at random above it),
# and the status code, `retry-after-ms` and the header names need the rest. Details that would not fit are left
# out: the call keeps its code, message and `retry-after-ms`.
MAX_STATUS_TRAILER_BYTES = 7168
FIRST_MESSAGE_TIMEOUT_S = 30.0
# How long a client stream refused before its first message (a caller the mesh denies) waits for that message
# before its status goes out: a status that reaches the client before it has written its request is lost there,
# since grpc-aio turns the write that follows into an INTERNAL error.
REFUSAL_WAITS_FOR_REQUEST_S = 2.0

# Absolute deadline (time.monotonic) of the RPC being served, so calls it makes downstream inherit it.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("lmesh_deadline", default=None)
# What to call with the final status code when the RPC being served ends (on_call_end).
_call_end: contextvars.ContextVar[list[Callable[[grpc.StatusCode], None]] | None] = contextvars.ContextVar(
    "lmesh_call_end", default=None)
# rpc.server.call.duration's buckets (s): unary calls take milliseconds, a chat's stream seconds to minutes.
RPC_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        120.0, 300.0)

# Methods that are infrastructure, not product: no span, no mapping (reflection is checked like the rest when
# the service checks its callers; health never is: Consul's check carries no certificate).
_HEALTH_PREFIX = "/grpc.health."
_UNTRACED_PREFIXES = (_HEALTH_PREFIX, "/grpc.reflection.")


def remaining_time(default: float | None = None) -> float | None:
    """Seconds left before the current RPC's deadline, or `default` when there is none."""
    deadline = _deadline.get()
    if deadline is None:
        return default
    return max(0.0, deadline - time.monotonic())


def on_call_end(callback: Callable[[grpc.StatusCode], None]) -> bool:
    """Has `callback(code)` called once the RPC being served ends, with the status code its caller gets: OK, the
    code an error maps to, CANCELLED (the client went away) or DEADLINE_EXCEEDED. False (and never called) outside a
    call the shared interceptor serves. A callback that raises is logged and does not touch the call."""
    callbacks = _call_end.get()
    if callbacks is None:
        return False
    callbacks.append(callback)
    return True


def call_options(timeout: float | None = None) -> dict[str, Any]:
    """Keyword arguments for an outgoing call: trace context plus the tighter of `timeout` and our deadline."""
    left = remaining_time()
    if left is not None:
        timeout = left if timeout is None else min(timeout, left)
    return {"metadata": inject_metadata(), "timeout": timeout}


async def first_message(requests: AsyncIterator[Any], kind: str = "start",
                        timeout_s: float = FIRST_MESSAGE_TIMEOUT_S) -> Any:
    """The first message of a client stream, which must set the oneof field `kind` (INVALID_ARGUMENT otherwise)
    and arrive within `timeout_s` (so streams opened and left idle do not hold the server).

    Returns the message's `kind` field; later messages stay readable from the same iterator.
    """
    try:
        async with asyncio.timeout(timeout_s):
            first = await anext(aiter(requests), None)
    except TimeoutError:
        raise InvalidArgument(kind, f"no {kind} message within {timeout_s:g} s of opening the stream") from None
    if first is None:
        raise InvalidArgument(kind, f"the stream ended before a {kind} message")
    if first.WhichOneof("kind") != kind:
        raise InvalidArgument(kind, f"the first message must carry {kind}")
    return getattr(first, kind)


def status_for(exc: BaseException, span: trace.Span | None = None,
               ) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, message and trailing metadata a client sees for `exc` raised in `span`'s call."""
    if isinstance(exc, LmeshError):
        return exc.code, exc.message, exc.trailing_metadata()
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RELAYED_UPSTREAM_CODES:
        # A peer's advice to the client (when to retry) travels with its code.
        trailers = tuple((k, v) for k, v in exc.trailing_metadata() or () if k in RELAYED_TRAILERS)
        return exc.code(), exc.details() or exc.code().name.lower(), trailers
    return grpc.StatusCode.INTERNAL, f"internal error (trace_id={current_trace_id(span)})", ()


def _upstream_details(exc: grpc.aio.AioRpcError) -> list[Message] | None:
    """The typed details of a peer's google.rpc.Status, when it sent a readable one for this code, of a sane size
    (its message is not relayed: ours replaces it)."""
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                upstream = status_pb2.Status.FromString(value)
            except DecodeError:
                return None
            if upstream.code != exc.code().value[0]:
                return None
            if sum(detail.ByteSize() for detail in upstream.details) > MAX_RELAYED_DETAILS_BYTES:
                return None
            return list(upstream.details)
    return None


def error_reason(exc: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason a peer's error carries (INVALID_FIELD, MESH_DENIED, ...), or None."""
    for detail in _upstream_details(exc) or ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):  # an Any
            return info.reason
    return None


def details_for(exc: BaseException, code: grpc.StatusCode, span: trace.Span | None = None) -> list[Message]:
    """The google.rpc detail messages a client gets with `exc`, which status_for maps to `code`: the error's own
    (LmeshError.details), a relayed peer's (kept as they came; generic ones for its code when it sent none),
    or, for a bug, ErrorInfo INTERNAL with the trace id that the message names."""
    if code == grpc.StatusCode.INTERNAL:
        return [error_info(Reason.INTERNAL, {"trace_id": current_trace_id(span)})]
    if isinstance(exc, LmeshError):
        return exc.details()
    if isinstance(exc, grpc.aio.AioRpcError):
        relayed = _upstream_details(exc)
        if relayed is not None:
            return relayed
        details: list[Message] = [error_info(code.name)]
        retry_ms = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
        if isinstance(retry_ms, str) and retry_ms.isdigit():
            details.append(retry_info(int(retry_ms) / 1000))
        return details
    return [error_info(code.name)]


def status_details(code: grpc.StatusCode, message: str, details: list[Message]) -> bytes:
    """The `grpc-status-details-bin` trailer's value: a google.rpc.Status whose code and message must be the
    call's own, exactly (clients check that), so `message` is the final, bounded one."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        if isinstance(detail, any_pb2.Any):  # relayed from a peer as it came
            status.details.append(detail)
        else:
            status.details.add().Pack(detail)
    return status.SerializeToString()


def _fits(message: str, details: bytes) -> bool:
    """Whether `grpc-message` (bytes outside printable ASCII, and '%', take 3) and `grpc-status-details-bin`
    (base64) stay within MAX_STATUS_TRAILER_BYTES together."""
    return encoded_message_size(message) + (len(details) * 4 + 2) // 3 <= MAX_STATUS_TRAILER_BYTES




# Status messages echo what the caller sent (a model name, a role). gRPC percent-encodes the message into the
# `grpc-message` trailer (every byte outside printable ASCII becomes three), and C-core clients refuse trailers
# over 8 KiB with RESOURCE_EXHAUSTED (grpc-js drops the whole connection): the bound is on the encoded size.
MAX_STATUS_MESSAGE_BYTES = 2048


def _encoded_size(char: str) -> int:
    """Bytes `char` takes in a percent-encoded grpc-message."""
    return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in char.encode("utf-8", "surrogatepass"))


def encoded_message_size(message: str) -> int:
    """The size of `message` as gRPC percent-encodes it into the `grpc-message` trailer."""
    return sum(_encoded_size(char) for char in message)


def bounded(message: str) -> str:
    """`message`, cut at a character boundary so that its percent-encoded form stays within
    MAX_STATUS_MESSAGE_BYTES (saying how many characters were cut)."""
    if len(message) * 12 <= MAX_STATUS_MESSAGE_BYTES:
        return message
    room = MAX_STATUS_MESSAGE_BYTES - 64  # for the note on what was cut
    size, cut = 0, 0
    # Never past the bound: a message may echo megabytes a caller sent, and each one is sized in Python.
    for index, char in enumerate(message):
        size += _encoded_size(char)
        if size <= room:
            cut = index + 1
        elif size > MAX_STATUS_MESSAGE_BYTES:
            return f"{message[:cut]}… ({len(message) - cut} more characters)"
    return message


def _record_failure(span: trace.Span, code: grpc.StatusCode, message: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {bounded(message)}"))


def mark_failed(span: trace.Span, exc: BaseException) -> None:
    """Marks `span` failed with the status `exc` would give a caller (code and message; no repr, no traceback:
    an unknown model or a bad key is the caller's mistake, not a stack to export)."""
    code, message, _ = status_for(exc, span)
    _record_failure(span, code, message)


def _deadline_passed(context: grpc.aio.ServicerContext, margin_s: float = 0.001) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= margin_s


async def abort_elsewhere(context: grpc.aio.ServicerContext, error: LmeshError,
                          handler: asyncio.Task[Any] | None) -> None:
    """Ends the call of `context` with `error` (code, message, trailers and details as the interceptor sends them)
    from outside its `handler` task, which cannot raise it: blocked writing to a client that stopped reading. The
    status goes out behind the messages already written (the client gets it if it reads again); the handler is
    cancelled at once, so everything the call holds here is let go."""
    code, message, trailers = status_for(error)
    final = bounded(message)
    details = status_details(code, final, details_for(error, code))
    sent: tuple[tuple[str, str | bytes], ...] = (*trailers, (STATUS_DETAILS_KEY, details)) if _fits(final, details) \
        else trailers
    aborting = asyncio.ensure_future(context.abort(code, final, trailing_metadata=sent))
    await asyncio.sleep(0)  # the status is queued first: cancelling the handler alone would leave the call mute
    if handler is not None:
        handler.cancel()
    try:
        await aborting
    except grpc.aio.AbortError:
        pass
    except Exception as exc:  # gRPC drops a status that never left (the server stopped first)
        log.debug("the status of an aborted call was not sent: %s", exc)


def _mark_ended_early(span: trace.Span, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A call gRPC cancelled under the handler: aborted from another task (`abort_elsewhere`), its deadline passed
    (an error), or the client went away."""
    aborted = _aborted_code(context) if context.code() is not None else grpc.StatusCode.OK
    if aborted not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
        _record_failure(span, aborted, context.details() or aborted.name)
        return aborted
    if _deadline_passed(context):
        _record_failure(span, grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
        return grpc.StatusCode.DEADLINE_EXCEEDED
    # The caller's choice, not a failure of ours (OpenTelemetry's gRPC conventions leave it unset too).
    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
    span.add_event("cancelled by the client")
    return grpc.StatusCode.CANCELLED


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code a handler's context.abort() set (UNKNOWN when gRPC does not say)."""
    with contextlib.suppress(Exception):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        if isinstance(code, int):
            return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


@dataclass(frozen=True)
class Undecodable:
    """A request message the deserializer refused (bytes that are not the RPC's message type, or a string field
    that is not UTF-8, as a JavaScript string holding half an emoji encodes): the call answers INVALID_ARGUMENT
    instead of gRPC's UNKNOWN (unary) or an INTERNAL with a logged traceback (streams)."""

    error: str

    def problem(self) -> InvalidArgument:
        return InvalidArgument("request", f"the message could not be decoded ({self.error}); string fields must be "
                                          "valid UTF-8")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, whichever implementation raised it
            return Undecodable(str(exc) or type(exc).__name__)

    return parse


class _CheckedRequests:
    """A client stream's messages: an undecodable first message fails the call (INVALID_ARGUMENT); a later one,
    after a valid start, is skipped and logged, since the task reading it (a cancel watcher) cannot fail the
    call."""

    def __init__(self, requests: AsyncIterator[Any], method: str) -> None:
        self._requests = aiter(requests)
        self._method = method
        self._first = True
        self._asked = False  # whether anything has waited for a message yet

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        self._asked = True
        while True:
            message = await anext(self._requests)
            if not isinstance(message, Undecodable):
                self._first = False
                return message
            if self._first:
                raise message.problem()
            log.info("%s: skipped a message that could not be decoded (%s)", self._method, message.error)

    async def await_first(self, timeout_s: float) -> None:
        """Waits (at most `timeout_s`) until the client has sent its first message, when nothing asked for one."""
        if not self._asked:
            with contextlib.suppress(Exception):  # ended, undecodable, already being read, or never sent
                await asyncio.wait_for(anext(self._requests), timeout_s)

    async def aclose(self) -> None:
        """Ends gRPC's message generator when the call ends. Suspended after a message (a call refused on its
        first one), it holds that message in a reference cycle with its receiver until a full garbage
        collection. One still reading (a task that watches for a cancel) ends when that task is cancelled."""
        close = getattr(self._requests, "aclose", None)
        if close is not None:
            with contextlib.suppress(RuntimeError):  # "already running": another task awaits it
                await close()


class CallerCheck(Protocol):
    """Decides whether the caller behind a call may make it (services.common.connect.MeshGuard): raises an
    LmeshError when not."""

    async def check(self, context: grpc.aio.ServicerContext) -> None: ...


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Opens `lmesh.<service>/<Rpc>` spans in the caller's trace, checks the caller (`guard`, on an internal
    service of an mTLS mesh: every method but health, reflection included), maps exceptions to status codes, and
    records each call's duration by method and status code (`rpc.server.call.duration`, when given a `meter`)."""

    def __init__(self, service: str, tracer: trace.Tracer, guard: CallerCheck | None = None,
                 meter: Meter | None = None) -> None:
        self._service = service
        self._tracer = tracer
        self._guard = guard
        self._duration = None if meter is None else meter.create_histogram(
            "rpc.server.call.duration", unit="s", description="Duration of incoming RPCs (a stream: until it ends)",
            explicit_bucket_boundaries_advisory=RPC_DURATION_BUCKETS)
        # Set when a drain's grace is about to run out: streams still running end with it at their next
        # message, instead of being cut with gRPC's bare "Cancelling all calls".
        self.expired: LmeshError | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_HEALTH_PREFIX):
            return handler
        guard = self._guard
        if guard is None and method.startswith(_UNTRACED_PREFIXES):
            return handler
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        rpc_service, _, rpc_name = method.lstrip("/").partition("/")
        span_name = f"lmesh.{self._service}/{rpc_name}"
        attributes = {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_name}
        parent = extract_context(metadata)
        # The method as OpenTelemetry's RPC conventions name it: only methods this server has (handler is set).
        metric_attributes = {"rpc.system.name": "grpc", "rpc.method": method.lstrip("/")}
        duration = self._duration

        def start(context: grpc.aio.ServicerContext) -> tuple[trace.Span, otel_context.Context]:
            remaining = context.time_remaining()
            _deadline.set(None if remaining is None else time.monotonic() + remaining)
            span = self._tracer.start_span(span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            return span, trace.set_span_in_context(span)

        def ended(started: float, callbacks: list[Callable[[grpc.StatusCode], None]], code: grpc.StatusCode) -> None:
            if duration is not None:
                duration.record(time.monotonic() - started,
                                {**metric_attributes, "rpc.response.status_code": code.name})
            for callback in callbacks:
                try:
                    callback(code)
                except Exception:
                    log.exception("%s: a call-end callback failed", method)

        def fail(context: grpc.aio.ServicerContext, span: trace.Span, exc: Exception) -> grpc.StatusCode:
            # The call's own span: a streaming handler's failure can surface outside the span's context.
            code, message, trailers = status_for(exc, span)
            shown: BaseException = exc
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and not _deadline_passed(context, margin_s=1.0):
                # A call this one made ran out of its own time budget, not the caller's deadline (which calls
                # downstream inherit, so theirs pass a moment before ours): to the caller that is a dependency
                # that did not answer, worth a retry.
                shown = Unavailable(f"a dependency did not answer in time ({message}); retry",
                                    reason=Reason.DEPENDENCY_TIMEOUT)
                code, message, trailers = status_for(shown, span)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed (trace_id=%s)", method, current_trace_id(span), exc_info=exc)
            _record_failure(span, code, message)
            final = bounded(message)
            # The typed details go with the message the client gets, after bounding: their Status must match it.
            details = status_details(code, final, details_for(shown, code, span))
            sent: tuple[tuple[str, str | bytes], ...] = trailers
            if _fits(final, details):
                sent = (*sent, (STATUS_DETAILS_KEY, details))
            if sent:
                context.set_trailing_metadata(sent)
            # The status is set and the handler returns, rather than context.abort(): gRPC would keep the abort
            # error with the call, and through its traceback the call's frames, so the call and its request data
            # (a refused 4 MB prompt, the last message a stream received) would stay alive in a reference cycle
            # until the next full garbage collection.
            context.set_code(code)
            context.set_details(final)
            return code

        if handler.unary_unary or handler.stream_unary:
            is_stream_in = handler.unary_unary is None
            inner_unary = handler.stream_unary if is_stream_in else handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, code = time.monotonic(), grpc.StatusCode.UNKNOWN
                callbacks: list[Callable[[grpc.StatusCode], None]] = []
                _call_end.set(callbacks)
                span, span_context = start(context)
                token = otel_context.attach(span_context)
                if is_stream_in:
                    request = _CheckedRequests(request, method)
                try:
                    if guard is not None:
                        await guard.check(context)
                    if isinstance(request, Undecodable):
                        raise request.problem()
                    response = await inner_unary(request, context)
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
                    code = grpc.StatusCode.OK
                    return response
                except grpc.aio.AbortError:
                    code = _aborted_code(context)
                    raise
                except asyncio.CancelledError:
                    code = _mark_ended_early(span, context)
                    raise
                except Exception as exc:
                    if isinstance(request, _CheckedRequests):
                        await request.await_first(REFUSAL_WAITS_FOR_REQUEST_S)
                    code = fail(context, span, exc)
                finally:
                    otel_context.detach(token)
                    span.end()
                    if isinstance(request, _CheckedRequests):
                        await request.aclose()
                    ended(started, callbacks, code)

            factory = grpc.stream_unary_rpc_method_handler if is_stream_in else grpc.unary_unary_rpc_method_handler
            return factory(unary, request_deserializer=_tolerant(handler.request_deserializer),
                           response_serializer=handler.response_serializer)

        is_stream_in = handler.unary_stream is None
        inner_stream = handler.stream_stream if is_stream_in else handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, code = time.monotonic(), grpc.StatusCode.UNKNOWN
            callbacks: list[Callable[[grpc.StatusCode], None]] = []
            _call_end.set(callbacks)
            span, span_context = start(context)
            if is_stream_in:
                request = _CheckedRequests(request, method)
            responses = inner_stream(request, context)
            try:
                if guard is not None:
                    await guard.check(context)
                if isinstance(request, Undecodable):
                    raise request.problem()
                while True:
                    # The span is current only while the servicer runs: between messages this generator may
                    # be resumed or closed from another task, where a context token could not be detached.
                    token = otel_context.attach(span_context)
                    try:
                        response = await anext(responses)
                    except StopAsyncIteration:
                        break
                    finally:
                        otel_context.detach(token)
                    if self.expired is not None:
                        raise self.expired
                    yield response
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
                code = grpc.StatusCode.OK
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = _mark_ended_early(span, context)
                raise
            except Exception as exc:
                if isinstance(request, _CheckedRequests):
                    await request.await_first(REFUSAL_WAITS_FOR_REQUEST_S)
                code = fail(context, span, exc)
            finally:
                await responses.aclose()  # the servicer's own cleanup (cancel upstream calls) runs now
                span.end()
                if isinstance(request, _CheckedRequests):
                    await request.aclose()
                ended(started, callbacks, code)

        factory = grpc.stream_stream_rpc_method_handler if is_stream_in else grpc.unary_stream_rpc_method_handler
        return factory(streaming, request_deserializer=_tolerant(handler.request_deserializer),
                       response_serializer=handler.response_serializer)

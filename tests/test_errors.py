"""Typed error details: each LmeshError's status code and google.rpc details, and what a client reads from the
`grpc-status-details-bin` trailer through the shared interceptor (grpc_status.rpc_status)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import errors, rpc
from services.common.errors import (
    ERROR_DOMAIN,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Limit,
    LmeshError,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.rpc import (
    MAX_STATUS_MESSAGE_BYTES,
    STATUS_DETAILS_KEY,
    _fits,
    bounded,
    details_for,
    encoded_message_size,
    status_details,
    status_for,
)
from tests.harness import ROOT, intercepted

Code = grpc.StatusCode
QUEUE = Limit("inference.queue", subject="model:m:1", value=4)


def info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)


def retry(ms: int) -> error_details_pb2.RetryInfo:
    detail = error_details_pb2.RetryInfo()
    detail.retry_delay.FromMilliseconds(ms)
    return detail


def bad_request(field: str, description: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)])


def quota(limit: Limit, description: str) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
        subject=limit.subject, description=description, quota_id=limit.id, quota_value=limit.value or 0)])


# Every LmeshError a servicer raises -> (code, details in order, trailing metadata).
MAPPING: list[tuple[LmeshError, Code, list[Message], dict[str, str]]] = [
    (InvalidArgument("messages[0].role", "must be one of system, user, assistant"), Code.INVALID_ARGUMENT,
     [info("INVALID_FIELD", field="messages[0].role"),
      bad_request("messages[0].role", "must be one of system, user, assistant")], {}),
    (NotFound("artifact ab12 not found"), Code.NOT_FOUND, [info("NOT_FOUND")], {}),
    (NotFound("model 'x' not found", reason=Reason.MODEL_NOT_FOUND, metadata={"model": "x"}), Code.NOT_FOUND,
     [info("MODEL_NOT_FOUND", model="x")], {}),
    (AlreadyExists("model 'm:1' is already registered"), Code.ALREADY_EXISTS, [info("ALREADY_EXISTS")], {}),
    (FailedPrecondition("m:1 has no chat template"), Code.FAILED_PRECONDITION, [info("FAILED_PRECONDITION")], {}),
    (Unauthenticated("invalid API key"), Code.UNAUTHENTICATED, [info("UNAUTHENTICATED")], {}),
    (PermissionDenied("key k may not use model 'm'", reason=Reason.MODEL_NOT_ALLOWED, metadata={"model": "m"}),
     Code.PERMISSION_DENIED, [info("MODEL_NOT_ALLOWED", model="m")], {}),
    (ResourceExhausted("inference queue is full", retry_after_s=1.0, reason=Reason.QUEUE_FULL, limit=QUEUE),
     Code.RESOURCE_EXHAUSTED,
     [info("QUEUE_FULL", limit="inference.queue"), quota(QUEUE, "inference queue is full"), retry(1000)],
     {"retry-after-ms": "1000"}),
    # A limit with no delay known yet, and one with neither: the details say only what is known.
    (ResourceExhausted("budget spent", limit=Limit("policy.token_budget", "tenant:acme")), Code.RESOURCE_EXHAUSTED,
     [info("RESOURCE_EXHAUSTED", limit="policy.token_budget"),
      quota(Limit("policy.token_budget", "tenant:acme"), "budget spent")], {}),
    (ResourceExhausted("too much"), Code.RESOURCE_EXHAUSTED, [info("RESOURCE_EXHAUSTED")], {}),
    (DeadlineExceeded("deadline exceeded while queued"), Code.DEADLINE_EXCEEDED, [info("DEADLINE_EXCEEDED")], {}),
    (Cancelled("cancelled"), Code.CANCELLED, [info("CANCELLED")], {}),
    (Unavailable("no passing instance of lmesh-registry"), Code.UNAVAILABLE, [info("UNAVAILABLE")], {}),
    (Unavailable("draining", retry_after_s=0.25, reason=Reason.DRAINING), Code.UNAVAILABLE,
     [info("DRAINING"), retry(250)], {"retry-after-ms": "250"}),
]


def concrete_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= concrete_subclasses(sub)
        if "code" in vars(sub):
            found.add(sub)
    return found


def test_every_error_class_is_mapped_here() -> None:
    """A new LmeshError subclass needs its row above (its code, reason and details)."""
    assert concrete_subclasses(LmeshError) == {type(error) for error, *_ in MAPPING}


@pytest.mark.parametrize(("error", "code", "details", "trailers"), MAPPING,
                         ids=[f"{type(e).__name__}-{e.reason}" for e, *_ in MAPPING])
def test_each_error_maps_to_its_code_and_typed_details(error: LmeshError, code: Code, details: list[Message],
                                                       trailers: dict[str, str]) -> None:
    got_code, message, got_trailers = status_for(error)
    assert (got_code, message, dict(got_trailers)) == (code, error.message, trailers)
    assert details_for(error, got_code) == details


def test_a_class_without_a_specific_reason_carries_its_codes_name() -> None:
    for cls in concrete_subclasses(LmeshError) - {InvalidArgument}:
        assert cls.reason == cls.code.name, cls
    assert set(Reason) >= {Reason(cls.reason) for cls in concrete_subclasses(LmeshError)}


def test_a_detail_echoing_a_huge_field_is_capped() -> None:
    error = InvalidArgument("model", f"'{'x' * 70000}' is not a model reference")
    [_, request] = error.details()
    assert isinstance(request, error_details_pb2.BadRequest)
    assert len(request.field_violations[0].description) <= errors.MAX_DETAIL_CHARS + 1


def test_a_bug_is_internal_with_only_the_trace_id() -> None:
    code, message, trailers = status_for(KeyError("secret_internal_detail"))
    [detail] = details_for(KeyError("secret_internal_detail"), code)
    assert code == Code.INTERNAL and not trailers
    assert isinstance(detail, error_details_pb2.ErrorInfo) and detail.reason == "INTERNAL"
    assert dict(detail.metadata) == {"trace_id": re.search(r"trace_id=(\w+)", message).group(1)}  # type: ignore


def upstream_error(code: Code, message: str, details: list[Message] | None,
                   retry_after_ms: str | None = None) -> grpc.aio.AioRpcError:
    trailers: list[tuple[str, str | bytes]] = []
    if retry_after_ms is not None:
        trailers.append(("retry-after-ms", retry_after_ms))
    if details is not None:
        status = status_pb2.Status(code=code.value[0], message=message)
        for detail in details:
            status.details.add().Pack(detail)
        trailers.append((STATUS_DETAILS_KEY, status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), message)


def unpacked(details: list[Any]) -> list[Message]:
    """Any messages (relayed as they came) as the detail messages they hold."""
    out: list[Message] = []
    for detail in details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure,
                    error_details_pb2.BadRequest):
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                out.append(message)
    return out


def test_a_relayed_upstream_error_keeps_its_details() -> None:
    sent = [info("QUEUE_FULL", limit="inference.queue"), quota(QUEUE, "full"), retry(1000)]
    error = upstream_error(Code.RESOURCE_EXHAUSTED, "inference queue is full", sent, "1000")
    code, _, _ = status_for(error)
    assert unpacked(details_for(error, code)) == sent


def test_a_relayed_upstream_error_without_details_gets_its_codes() -> None:
    """A peer that sends no Status (not lmesh, or older): ErrorInfo for its code, RetryInfo from its trailer."""
    error = upstream_error(Code.RESOURCE_EXHAUSTED, "full", None, "1500")
    assert details_for(error, status_for(error)[0]) == [info("RESOURCE_EXHAUSTED"), retry(1500)]
    # A Status for another code than the call's is not believed.
    mismatched = upstream_error(Code.NOT_FOUND, "gone", [info("QUEUE_FULL")])
    mismatched = grpc.aio.AioRpcError(Code.UNAVAILABLE, grpc.aio.Metadata(), mismatched.trailing_metadata(), "x")
    assert details_for(mismatched, status_for(mismatched)[0]) == [info("UNAVAILABLE")]


def test_an_upstream_bug_is_not_relayed_nor_its_details() -> None:
    error = upstream_error(Code.INTERNAL, "KeyError: secret", [info("SECRET")])
    code, message, _ = status_for(error)
    [detail] = details_for(error, code)
    assert code == Code.INTERNAL and "secret" not in message
    assert isinstance(detail, error_details_pb2.ErrorInfo) and detail.reason == "INTERNAL"


# -- through a real grpc.aio server and the shared interceptor


def details_of(error: grpc.aio.AioRpcError) -> list[Message]:
    status = rpc_status.from_call(error)  # raises when its code or message differ from the call's
    assert status is not None, "no grpc-status-details-bin trailer"
    return unpacked(list(status.details))


async def call(channel: grpc.aio.Channel, method: str, request: bytes = b"x") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "Bidi":
            stream = channel.stream_stream("/lmesh.test.v1.Test/Bidi")()
            await stream.write(request)
            await stream.read()
        else:
            await channel.unary_unary(f"/lmesh.test.v1.Test/{method}")(request)
    return caught.value


@pytest.mark.parametrize("method", ["Unary", "Bidi"])
async def test_a_client_reads_the_details_from_the_standard_trailer(method: str) -> None:
    raised: list[LmeshError] = [
        InvalidArgument("max_tokens", "must be > 0, got 0"),
        ResourceExhausted("inference queue is full", retry_after_s=1.0, reason=Reason.QUEUE_FULL, limit=QUEUE),
    ]

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise raised[int(request)]

    async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            raise raised[int(request)]
        yield b""

    methods = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
               "Bidi": grpc.stream_stream_rpc_method_handler(bidi)}
    async with intercepted(methods) as channel:
        invalid = await call(channel, method, b"0")
        full = await call(channel, method, b"1")
    assert invalid.code() == Code.INVALID_ARGUMENT
    assert details_of(invalid) == [info("INVALID_FIELD", field="max_tokens"),
                                   bad_request("max_tokens", "must be > 0, got 0")]
    assert full.code() == Code.RESOURCE_EXHAUSTED
    assert details_of(full) == [info("QUEUE_FULL", limit="inference.queue"),
                                quota(QUEUE, "inference queue is full"), retry(1000)]
    assert dict(full.trailing_metadata())["retry-after-ms"] == "1000"  # the trailer that was there before stays


async def test_a_bounded_message_and_its_status_agree() -> None:
    """The Status in the trailer repeats the message the client gets, cut as the interceptor cuts it."""
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument("messages[0].role", f"{request.decode()!r} is not one of system, user, assistant")

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(unary)}) as channel:
        error = await call(channel, "Unary", b"x" * 65536)
    message = error.details() or ""
    assert message.endswith(" more characters)") and len(message) <= MAX_STATUS_MESSAGE_BYTES
    status = rpc_status.from_call(error)
    assert status is not None and status.message == message
    [reason, request] = unpacked(list(status.details))
    assert reason == info("INVALID_FIELD", field="messages[0].role")
    assert isinstance(request, error_details_pb2.BadRequest)
    assert request.field_violations[0].field == "messages[0].role"
    assert len(request.field_violations[0].description) <= errors.MAX_DETAIL_CHARS + 1


async def test_details_never_push_a_long_status_over_the_clients_header_limit() -> None:
    """A bounded message of characters that grpc-message percent-encodes (3 bytes a byte) plus its Status again in
    base64 would pass gRPC's 8 KiB trailer limit, and the client would get "Stream removed" instead of the error:
    details that do not fit are left out, and the call keeps its code and message."""
    field = "é" * 300  # in the message, and (cut) in ErrorInfo and BadRequest too

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument(field, f"{request.decode()!r} is not one of system, user, assistant")

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(unary)}) as channel:
        for _ in range(10):  # gRPC refuses trailers over its soft limit at random: one try could pass by luck
            error = await call(channel, "Unary", "é".encode() * 40000)
            assert error.code() == Code.INVALID_ARGUMENT, error.details()
            assert (error.details() or "").startswith(f"{field}: 'éé")
            status = rpc_status.from_call(error)  # present when it fits (a tighter message bound), then agreeing
            assert status is None or status.message == error.details()


def test_bounding_a_huge_message_sizes_only_what_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message echoing megabytes a caller sent is cut after sizing at most the bound's worth of characters: sizing
    all of it, in Python, held a registry's event loop for seconds per call, and its health check failed."""
    sized = 0
    real = rpc._encoded_size

    def counting(char: str) -> int:
        nonlocal sized
        sized += 1
        return real(char)

    monkeypatch.setattr(rpc, "_encoded_size", counting)
    message = bounded("'" + "\x00" * 7_000_000 + "' is not a model name")
    assert message.endswith(" more characters)") and encoded_message_size(message) <= MAX_STATUS_MESSAGE_BYTES
    assert sized <= MAX_STATUS_MESSAGE_BYTES + 1
    assert bounded("é" * 300) == "é" * 300  # a message within the bound stays whole


def test_details_fit_beside_any_bounded_message() -> None:
    """The guard above never drops the details of an error whose message was bounded, ASCII or not (the bound is
    on the percent-encoded size); it drops them beside a message that was not."""
    error = InvalidArgument("messages[0].role", "x" * 70000)
    code, message, _ = status_for(error)
    final = bounded(message)
    assert _fits(final, status_details(code, final, details_for(error, code)))
    wide_error = InvalidArgument("é" * 300, "é" * 70000)
    wide = bounded(wide_error.message)
    assert _fits(wide, status_details(code, wide, details_for(wide_error, code)))
    assert not _fits("é" * 3000, status_details(code, "é" * 3000, details_for(wide_error, code)))


async def test_an_upstream_error_relayed_through_a_second_service_keeps_its_details() -> None:
    """The gateway relays inference's RESOURCE_EXHAUSTED: its own message, bounded, with the replica's details."""
    long_reason = "queue is full " + "x" * 5000

    async def upstream(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ResourceExhausted(long_reason, retry_after_s=2.0, reason=Reason.QUEUE_FULL, limit=QUEUE)

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(upstream)}) as upstream_channel:
        async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            response: bytes = await upstream_channel.unary_unary("/lmesh.test.v1.Test/Unary")(request)
            return response

        async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(relay)}) as channel:
            error = await call(channel, "Unary")
    assert error.code() == Code.RESOURCE_EXHAUSTED and (error.details() or "").startswith("queue is full x")
    assert dict(error.trailing_metadata())["retry-after-ms"] == "2000"
    [reason, limit, delay] = details_of(error)
    assert reason == info("QUEUE_FULL", limit="inference.queue") and delay == retry(2000)
    assert isinstance(limit, error_details_pb2.QuotaFailure) and limit.violations[0].quota_id == "inference.queue"


async def test_a_dependency_timing_out_says_so_in_its_details() -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise upstream_error(Code.DEADLINE_EXCEEDED, "Deadline Exceeded", None)

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(unary)}) as channel:
        error = await call(channel, "Unary")
    assert error.code() == Code.UNAVAILABLE and details_of(error) == [info("DEPENDENCY_TIMEOUT")]


async def test_a_bugs_details_carry_the_trace_id_its_message_names() -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise KeyError("secret_internal_detail")

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(unary)}) as channel:
        error = await call(channel, "Unary")
    trace_id = re.fullmatch(r"internal error \(trace_id=([0-9a-f]{32})\)", error.details() or "")
    assert error.code() == Code.INTERNAL and trace_id
    assert details_of(error) == [info("INTERNAL", trace_id=trace_id.group(1))]


def test_every_reason_is_documented_for_clients() -> None:
    """Clients in other languages see the protos and the README: every reason is named there."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Status codes")
    section = readme[start:readme.index("\n## ", start)]
    protos = "".join(p.read_text() for p in (ROOT / "protos").rglob("*.proto"))
    for reason in Reason:
        assert f"`{reason}`" in section, f"README's status codes section does not name {reason}"
        assert reason in protos, f"no proto names {reason}"


async def test_a_retry_loop_ends_when_a_failure_hid_its_cancellation() -> None:
    import asyncio

    tries = 0

    async def call_hiding_its_cancellation() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TimeoutError from None  # as a timeout firing in the same step as the cancellation

    async def retry_loop() -> None:
        nonlocal tries
        while True:
            tries += 1
            try:
                await call_hiding_its_cancellation()
            except Exception as exc:
                errors.end_if_cancelled(exc)
                await asyncio.sleep(0)

    task = asyncio.create_task(retry_loop())
    await asyncio.sleep(0.01)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert done and task.cancelled() and tries == 1


async def test_a_failure_with_no_cancellation_pending_is_left_to_the_loop() -> None:
    errors.end_if_cancelled(TimeoutError())  # returns: nothing asked this task to stop

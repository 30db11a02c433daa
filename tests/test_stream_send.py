"""Writing to a stream the server may already have ended: the call's real status must come from reading it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.peers import SEND_RACE_ATTEMPTS, lost_send_race, past_send_race, send, write_first
from tests.harness import ROOT


def failed_write(code: grpc.StatusCode, debug: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x", debug_error_string=debug)


class Call:
    def __init__(self, error: BaseException | None, status: grpc.StatusCode = grpc.StatusCode.OK) -> None:
        self.error = error
        self.status = status
        self.written: list[object] = []

    async def write(self, message: object) -> None:
        if self.error is not None:
            raise self.error
        self.written.append(message)

    async def code(self) -> grpc.StatusCode:
        return self.status


LOST = failed_write(grpc.StatusCode.INTERNAL, 'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation')


async def test_a_write_that_lost_the_race_leaves_the_status_to_the_read() -> None:
    assert lost_send_race(LOST)
    await send(Call(LOST), object())  # type: ignore[arg-type]
    await send(Call(asyncio.InvalidStateError("RPC already finished")), object())  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [failed_write(grpc.StatusCode.INTERNAL, "a bug elsewhere"),
                                   failed_write(grpc.StatusCode.UNAVAILABLE, "SendMessage")])
async def test_any_other_write_failure_is_raised(error: grpc.aio.AioRpcError) -> None:
    assert not lost_send_race(error)
    with pytest.raises(grpc.aio.AioRpcError):
        await send(Call(error), object())  # type: ignore[arg-type]


async def test_an_upload_whose_refusal_was_lost_to_the_race_is_sent_again_until_the_status_shows() -> None:
    refused = failed_write(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
    outcomes: list[BaseException | str] = [LOST, LOST, refused]

    async def upload() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await past_send_race(upload)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and outcomes == []
    outcomes[:] = [LOST, "stored"]
    assert await past_send_race(upload) == "stored"
    outcomes[:] = [LOST, LOST, LOST, "never asked"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await past_send_race(upload)  # three tries in all: the last loss is what the caller sees
    assert lost_send_race(caught.value) and outcomes == ["never asked"]


REFUSED = failed_write(grpc.StatusCode.PERMISSION_DENIED, "denied")


@pytest.mark.parametrize(("calls", "answered_by"), [
    ([Call(None)], 0),  # written at once
    ([Call(REFUSED, grpc.StatusCode.PERMISSION_DENIED)], 0),  # refused, and the write said so: the read says it too
    ([Call(asyncio.InvalidStateError(), grpc.StatusCode.UNAVAILABLE)], 0),  # already ended: the read says why
    ([Call(LOST, grpc.StatusCode.PERMISSION_DENIED)], 0),  # the write lost the race, not the status
    ([Call(LOST, grpc.StatusCode.INTERNAL), Call(None)], 1),  # the status was lost with the write: asked again
    ([Call(LOST, grpc.StatusCode.INTERNAL), Call(LOST, grpc.StatusCode.UNAUTHENTICATED)], 1),
    ([Call(LOST, grpc.StatusCode.INTERNAL) for _ in range(SEND_RACE_ATTEMPTS)] + [Call(None)],
     SEND_RACE_ATTEMPTS - 1),  # never more than SEND_RACE_ATTEMPTS calls
])
async def test_a_streams_first_message_is_sent_again_only_while_its_refusal_was_lost(calls: list[Call],
                                                                                      answered_by: int) -> None:
    more = iter(calls[1:])
    call = await write_first(calls[0], "start", lambda: next(more))  # type: ignore[arg-type]
    assert call is calls[answered_by]
    assert [len(c.written) for c in calls] == [int(c is call and c.error is None) for c in calls]


async def _refuse_unread(requests: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused before reading")


async def test_a_server_that_refuses_a_stream_unread_is_heard_on_fresh_connections() -> None:
    """The first call on a new connection loses the server's status to the write about once in a hundred here
    (INTERNAL): with `write_first` the caller sees the server's own code every time."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Refuser", {"Stream": grpc.stream_stream_rpc_method_handler(_refuse_unread)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        codes = []
        for _ in range(1000):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                method = channel.stream_stream("/test.Refuser/Stream")
                call = method()  # made apart from the write, as the gateway does: the race shows more then
                call = await write_first(call, b"start", method)
                codes.append(await call.code())
        assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED}
    finally:
        await server.stop(None)


# A server in a process of its own (the race needs the status to arrive while the client has not yet written),
# behind the shared interceptor with a caller check that refuses everyone, as an intention that denies a hop does.
_REFUSING_SERVER = """
import asyncio
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from services.common.errors import PermissionDenied
from services.common.rpc import ServerInterceptor


class RefuseEveryone:
    async def check(self, context: grpc.aio.ServicerContext) -> None:
        raise PermissionDenied("this caller may not call here")


async def echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def main() -> None:
    interceptor = ServerInterceptor("test", trace.get_tracer("test"), guard=RefuseEveryone())
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "lmesh.test.v1.Test", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def refusing_server() -> AsyncIterator[str]:
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _REFUSING_SERVER, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'gen'}:{ROOT}"})
    try:
        assert server.stdout is not None
        port = int(await asyncio.wait_for(server.stdout.readline(), 60))
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        await server.wait()


async def test_a_stream_the_mesh_refuses_says_so_to_a_client_that_writes_at_once() -> None:
    """A refusal sent before the client wrote its request was lost in grpc-aio's write as INTERNAL (2 to 15 % of
    calls here, three times running in a CI run): the server now waits for the request before refusing."""
    async with refusing_server() as target:
        codes: list[grpc.StatusCode] = []
        for fresh_connections in (False, True):
            channel = grpc.aio.insecure_channel(target)
            for _ in range(250):
                if fresh_connections:
                    await channel.close()
                    channel = grpc.aio.insecure_channel(target)
                call = channel.stream_stream("/lmesh.test.v1.Test/Stream")()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(b"start")
                codes.append(await call.code())
            await channel.close()
    assert collections.Counter(codes) == {grpc.StatusCode.PERMISSION_DENIED: 500}


@pytest.mark.parametrize("sends", ["nothing, and waits", "nothing, and closes its side"])
async def test_a_refused_stream_that_sends_nothing_still_hears_why(sends: str) -> None:
    from services.common.rpc import REFUSAL_WAITS_FOR_REQUEST_S

    async with refusing_server() as target, grpc.aio.insecure_channel(target) as channel:
        began = time.monotonic()
        call = channel.stream_stream("/lmesh.test.v1.Test/Stream")(timeout=30)
        if sends.endswith("closes its side"):
            await call.done_writing()
        assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
        waited = time.monotonic() - began
    if sends.endswith("closes its side"):
        assert waited < REFUSAL_WAITS_FOR_REQUEST_S
    else:
        assert REFUSAL_WAITS_FOR_REQUEST_S <= waited < REFUSAL_WAITS_FOR_REQUEST_S + 10

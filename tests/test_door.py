"""Overload at the front door: the gateway's bound on chats in flight (admission.py) and the per-stream buffer that
lets a client read at its own pace (coalesce.py). Unit tests, then the real request path, gRPC servicer (behind the
shared interceptor) and HTTP door in front of the fake ChatService of tests/test_openai_http.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx2
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from opentelemetry import trace

from services.common.config import ServiceConfig
from services.common.errors import Reason, ResourceExhausted, Unavailable
from services.gateway.accounting import Meter
from services.gateway.admission import MAX_RETRY_S, MIN_RETRY_S, ChatAdmission
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams
from services.gateway.coalesce import MAX_WAITING_MESSAGES, Coalescer, delta_size
from services.gateway.http_server import HttpDoor, OpenAIApp
from services.gateway.logprobs import Candidate, TokenLogprob
from services.gateway.servicer import GatewayServicer
from tests.harness import intercepted
from tests.test_openai_http import KEY, USER, FakeChat

# ---- the coalescing buffer ------------------------------------------------------------------------------------

STARTED = object()  # stands for ChatStarted: anything but a delta passes as it is


def _entry(serial: int, alternatives: int) -> TokenLogprob:
    return TokenLogprob(Candidate(serial, f"t{serial}".encode(), -0.5),
                        tuple(Candidate(1000 + i, b"alt", -2.0) for i in range(alternatives)))


DELTAS = st.lists(st.tuples(st.text(max_size=12), st.integers(0, 3), st.integers(0, 2)), max_size=40)


@dataclass
class Run:
    taken: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    most_buffered: int = 0
    most_waiting: int = 0


async def _coalesce(deltas: list[ChatDelta], source_pauses: list[int], writer_pauses: list[int], fail: bool,
                    max_message: int, max_buffered: int, max_messages: int) -> Run:
    run = Run()
    coalescer: Coalescer[Any] | None = None

    async def source() -> AsyncIterator[Any]:
        yield STARTED
        for index, delta in enumerate(deltas):
            for _ in range(source_pauses[index % len(source_pauses)]):
                await asyncio.sleep(0)
            yield delta
            assert coalescer is not None
            run.most_buffered = max(run.most_buffered, coalescer.buffered_bytes)
            run.most_waiting = max(run.most_waiting, coalescer.waiting)
        if fail:
            raise Unavailable("inference replica 127.0.0.1:1 became unavailable")
        yield ChatEnd(generation_pb2.FINISH_REASON_STOP, generation_pb2.Usage())

    coalescer = Coalescer(source(), max_message_bytes=max_message, max_buffered_bytes=max_buffered,
                          max_messages=max_messages)
    coalescer.start()
    try:
        async for event in coalescer:
            run.taken.append(event)
            for _ in range(writer_pauses[len(run.taken) % len(writer_pauses)]):
                await asyncio.sleep(0)
    except Unavailable as exc:
        run.error = exc
    finally:
        await coalescer.close()
    return run


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=DELTAS, source_pauses=st.lists(st.integers(0, 3), min_size=1, max_size=8),
       writer_pauses=st.lists(st.integers(0, 6), min_size=1, max_size=8), fail=st.booleans(),
       max_message=st.integers(1, 40), max_buffered=st.integers(1, 120), max_messages=st.integers(1, 6))
def test_the_buffer_gives_every_byte_and_entry_in_order_within_its_bounds_for_any_interleaving(
        specs: list[tuple[str, int, int]], source_pauses: list[int], writer_pauses: list[int], fail: bool,
        max_message: int, max_buffered: int, max_messages: int) -> None:
    serial = iter(range(10**6))
    deltas = [ChatDelta(text, [_entry(next(serial), alternatives) for _ in range(count)])
              for text, count, alternatives in specs]
    run = asyncio.run(_coalesce(deltas, source_pauses, writer_pauses, fail, max_message, max_buffered, max_messages))
    assert run.taken[0] is STARTED
    if fail:
        assert isinstance(run.error, Unavailable)  # after everything that came before it
        merged = run.taken[1:]
    else:
        assert run.error is None and isinstance(run.taken[-1], ChatEnd)
        merged = run.taken[1:-1]
    assert all(isinstance(delta, ChatDelta) for delta in merged)
    assert "".join(delta.text for delta in merged) == "".join(delta.text for delta in deltas)
    assert [entry for delta in merged for entry in delta.logprobs] == [e for d in deltas for e in d.logprobs]
    assert len(merged) <= len(deltas)
    largest = max((delta_size(delta) for delta in deltas), default=0)
    assert all(delta_size(delta) < max_message + largest for delta in merged)  # a merge stops past the cap
    assert run.most_buffered <= max_buffered + largest  # reading pauses past the bound
    # Messages kept apart up to max_messages; past it merged, a new one only past the size of a message.
    assert run.most_waiting <= max_messages + 1 + (max_buffered + largest) // max_message


async def test_a_writer_that_lags_gets_the_deltas_merged_and_one_that_keeps_up_gets_them_as_they_came() -> None:
    async def source(count: int, pause: bool) -> AsyncIterator[ChatDelta]:
        for index in range(count):
            yield ChatDelta(f"{index},")
            if pause:
                await asyncio.sleep(0)

    lagging = Coalescer(source(100, pause=False), max_messages=4)
    lagging.start()
    await asyncio.sleep(0.05)  # the writer is away: everything waits; past 4 messages, merged into the last
    assert [delta.text async for delta in lagging] == ["0,", "1,", "2,", "".join(f"{i}," for i in range(3, 100))]
    keeping_up = Coalescer(source(100, pause=True), max_messages=1)
    keeping_up.start()
    assert [delta.text async for delta in keeping_up] == [f"{i}," for i in range(100)]
    at_once = Coalescer(source(MAX_WAITING_MESSAGES, pause=False))  # a replay from the response cache
    at_once.start()
    await asyncio.sleep(0.05)
    assert [delta.text async for delta in at_once] == [f"{i}," for i in range(MAX_WAITING_MESSAGES)]


async def test_a_writer_stuck_in_a_write_is_reported_stalled_once_and_one_waiting_for_text_never_is() -> None:
    async def slow_source() -> AsyncIterator[ChatDelta]:
        for index in range(8):
            await asyncio.sleep(0.03)
            yield ChatDelta(str(index))

    stalls: list[float] = []
    waiting = Coalescer(slow_source(), stall_s=0.01, on_stall=lambda: stalls.append(0))
    waiting.start()
    assert "".join([delta.text async for delta in waiting]) == "01234567"  # a slow chat is not a stalled client
    assert not stalls and not waiting.stalled

    stuck = Coalescer(slow_source(), stall_s=0.05, on_stall=lambda: stalls.append(0))
    stuck.start()
    await anext(stuck)
    await asyncio.sleep(0.4)  # the write of the first delta never returns
    assert stalls == [0] and stuck.stalled
    await stuck.close()


# ---- the bound and its retry delay ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refusal(admission: ChatAdmission) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as refused, admission.admitted():
        pass
    return refused.value


def test_beyond_the_bound_a_chat_is_refused_gateway_busy_with_typed_details_and_the_place_frees_on_any_end() -> None:
    clock = Clock()
    admission = ChatAdmission(2, clock)
    with admission.admitted(), admission.admitted():
        assert admission.in_flight == 2
        error = _refusal(admission)
        assert error.reason == Reason.GATEWAY_BUSY and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.retry_after_s is not None and error.retry_after_s > 0
        assert dict(error.trailing_metadata())["retry-after-ms"] == str(int(error.retry_after_s * 1000))
        kinds = {type(detail).__name__: detail for detail in error.details()}
        assert kinds["QuotaFailure"].violations[0].quota_id == "gateway.chats"
        assert kinds["QuotaFailure"].violations[0].quota_value == 2
        assert kinds["RetryInfo"].retry_delay.ToMilliseconds() == int(error.retry_after_s * 1000)
    assert admission.in_flight == 0 and admission.refused == 1
    with pytest.raises(RuntimeError), admission.admitted():  # a chat that fails gives its place back too
        raise RuntimeError("a chat that failed")
    assert admission.in_flight == 0


def test_the_retry_delay_follows_how_long_chats_last_and_how_many_were_refused_before() -> None:
    clock = Clock()
    admission = ChatAdmission(4, clock)
    for _ in range(8):  # chats of 10 s: at 4 in flight, a place frees every 2.5 s
        with admission.admitted():
            clock.now += 10
    with contextlib.ExitStack() as places:
        for _ in range(4):
            places.enter_context(admission.admitted())
        delays = [_refusal(admission).retry_after_s for _ in range(3)]
        assert delays == pytest.approx([2.5, 5.0, 7.5])  # each refused caller is given the next free place
        clock.now += 7.5  # those places came and went: the next caller is first again
        assert _refusal(admission).retry_after_s == pytest.approx(2.5)
        clock.now += 100  # the four in flight are now far older than usual: they may last longer still
        assert _refusal(admission).retry_after_s == pytest.approx((7.5 + 100) / 4)  # their mean age
    shorter = ChatAdmission(4, clock)  # no chat finished yet: the age of those in flight is what is known
    with contextlib.ExitStack() as places:
        for _ in range(4):
            places.enter_context(shorter.admitted())
        clock.now += 2
        assert _refusal(shorter).retry_after_s == pytest.approx(0.5)


def test_the_retry_delay_stays_within_its_bounds() -> None:
    clock = Clock()
    admission = ChatAdmission(1, clock)
    with admission.admitted():
        assert _refusal(admission).retry_after_s == MIN_RETRY_S  # nothing known yet, and no time passed
        clock.now += 10_000
        assert [_refusal(admission).retry_after_s for _ in range(3)] == [MAX_RETRY_S] * 3


# ---- through the gRPC servicer and the HTTP door --------------------------------------------------------------

FLOOD_DELTAS, FLOOD_CHARS = 4000, 4096  # 16 MB: more than a connection's buffers take from a client that waits


def flood_text(index: int) -> str:
    return f"{index:08d}".ljust(FLOOD_CHARS, "-")


@dataclass
class FloodChat(FakeChat):
    """FakeChat, plus the model `flood`: an answer of FLOOD_DELTAS deltas made as fast as the gateway takes them;
    `generated` has when each request's generation ended (the engine's slot free again)."""

    generated: dict[str, float] = field(default_factory=dict)

    async def generate(self, version: object, prompt: list[int], max_tokens: int, params: ChatParams,
                       cancel: asyncio.Event, request_id: str = "", tokenizer: object = None,
                       meter: Meter | None = None, *, priority: int = 0,
                       placement: object = None) -> AsyncIterator[ChatDelta | ChatEnd]:
        if params.model != "flood":
            async for event in super().generate(version, prompt, max_tokens, params, cancel, request_id, tokenizer,
                                                meter, priority=priority, placement=placement):
                yield event
            return
        try:
            for index in range(FLOOD_DELTAS):
                yield ChatDelta(flood_text(index))
                await asyncio.sleep(0)
        finally:
            self.stopped.set()
        self.generated[request_id] = asyncio.get_running_loop().time()
        yield ChatEnd(generation_pb2.FINISH_REASON_LENGTH, generation_pb2.Usage(
            prompt_tokens=len(prompt), completion_tokens=FLOOD_DELTAS, total_tokens=len(prompt) + FLOOD_DELTAS))


ANSWER = "".join(flood_text(i) for i in range(FLOOD_DELTAS))


def flood_chat(**fields: Any) -> FloodChat:
    chat = FloodChat(accept_any=True, **fields)
    chat.stream_buffer_bytes = 2 * len(ANSWER)  # the whole answer fits: the engine never waits for the client
    return chat


@contextlib.asynccontextmanager
async def grpc_door(chat: FakeChat) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """The gateway's gRPC Chat, behind the shared interceptor, in front of `chat`."""
    handler = grpc.stream_stream_rpc_method_handler(
        GatewayServicer(chat).Chat, request_deserializer=gateway_pb2.ChatRequest.FromString,  # type: ignore[arg-type]
        response_serializer=gateway_pb2.ChatResponse.SerializeToString)
    async with intercepted({"Chat": handler}, service="lmesh.gateway.v1.Gateway") as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


@contextlib.asynccontextmanager
async def http_door(chat: FakeChat) -> AsyncIterator[tuple[HttpDoor, httpx2.AsyncClient]]:
    door = HttpDoor(OpenAIApp(chat, trace.get_tracer("test")), ServiceConfig(service="gateway"), 0,  # type: ignore[arg-type]
                    "--http-port")
    await door.start()
    try:
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{door.port}", timeout=30,
                                      headers={"authorization": f"Bearer {KEY}"}) as client:
            yield door, client
    finally:
        await door.stop()


async def chat_call(stub: gateway_pb2_grpc.GatewayStub, model: str) -> grpc.aio.StreamStreamCall:
    call = stub.Chat(metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
    start = gateway_pb2.ChatStart(model=model, max_tokens=10**6, messages=[gateway_pb2.Message(role="user",
                                                                                               content="hi")])
    await call.write(gateway_pb2.ChatRequest(start=start))
    return call


async def read_all(call: grpc.aio.StreamStreamCall) -> list[gateway_pb2.ChatResponse]:
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_grpc_beyond_the_bound_is_resource_exhausted_with_a_retry_delay_and_the_bound_frees_up() -> None:
    chat = FloodChat(max_chats=2)
    async with grpc_door(chat) as stub:
        running = [await chat_call(stub, "endless"), await chat_call(stub, "endless")]
        for call in running:
            assert (await call.read()).delta == "Paris"
        refused = await chat_call(stub, "tiny")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all(refused)
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent chats (--max-chats)" in (error.details() or "")
        retry_ms = int(dict(error.trailing_metadata() or ())["retry-after-ms"])
        assert retry_ms >= 50
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info) and info.reason == "GATEWAY_BUSY"
        assert any(detail.Unpack(retry) for detail in status.details)
        assert retry.retry_delay.ToMilliseconds() == retry_ms
        running[0].cancel()  # one chat ends: its place is free again
        assert await until(lambda: chat.admission.in_flight < 2, 5)
        answered = await read_all(await chat_call(stub, "tiny"))
        assert "".join(r.delta for r in answered) == "Paris is the capital of France."
        running[1].cancel()


async def test_http_beyond_the_bound_is_429_with_retry_after_and_the_bound_frees_up() -> None:
    chat = FloodChat(max_chats=1)
    async with http_door(chat) as (_, client):
        body = {"model": "endless", "messages": USER, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as streaming:
            assert streaming.status_code == 200
            await anext(streaming.aiter_lines())
            refused = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER})
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "gateway_busy"
            assert int(refused.headers["retry-after"]) >= 1
            assert int(refused.headers["retry-after-ms"]) >= 50
        assert await until(lambda: chat.admission.in_flight == 0, 5)
        answered = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER})
        assert answered.json()["choices"][0]["message"]["content"] == "Paris is the capital of France."


async def test_grpc_a_client_that_stops_reading_holds_back_neither_its_chat_nor_another_stream() -> None:
    chat = flood_chat()
    async with grpc_door(chat) as stub:
        loop = asyncio.get_running_loop()
        started = loop.time()
        paused = await chat_call(stub, "flood")
        first = await paused.read()  # then it reads nothing for a while
        other = await read_all(await chat_call(stub, "flood"))
        other_took = loop.time() - started
        # Side by side: the paused client's chat is generated to its end in a few times what the other stream
        # took to be read whole, while its client still reads nothing (the engine's slot is free again).
        assert await until(lambda: len(chat.generated) == 2, 5 * other_took + 1), other_took
        rest = await read_all(paused)
        assert first.delta + "".join(r.delta for r in rest) == ANSWER == "".join(r.delta for r in other)
        assert rest[-1].usage.completion_tokens == FLOOD_DELTAS
        assert len(rest) + 1 < FLOOD_DELTAS * 0.6  # the same answer in fewer, larger deltas
        assert chat.admission.in_flight == 0


async def test_http_a_client_that_stops_reading_holds_back_neither_its_chat_nor_another_stream() -> None:
    chat = flood_chat()
    async with http_door(chat) as (_, client):
        loop = asyncio.get_running_loop()
        body = {"model": "flood", "messages": USER, "stream": True}
        started = loop.time()
        async with client.stream("POST", "/v1/chat/completions", json=body) as paused:
            lines = paused.aiter_lines()
            first = await anext(lines)
            other = (await client.post("/v1/chat/completions", json=body)).text
            other_took = loop.time() - started
            assert await until(lambda: len(chat.generated) == 2, 5 * other_took + 1), other_took
            rest = [line async for line in lines]
        events = [line for line in (first, *rest) if line]

        def text(stream: list[str]) -> str:
            chunks = [json.loads(line[6:]) for line in stream if line.startswith("data: {")]
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

        assert text(events) == ANSWER == text(other.split("\n"))
        assert events[-1] == "data: [DONE]"
        assert len(events) < FLOOD_DELTAS * 0.6


async def test_http_two_choices_of_a_client_that_stops_reading_both_finish_and_merge() -> None:
    chat = flood_chat()
    chat.stream_buffer_bytes = 4 * len(ANSWER)
    async with http_door(chat) as (_, client):
        body = {"model": "flood", "messages": USER, "stream": True, "n": 2}
        async with client.stream("POST", "/v1/chat/completions", json=body) as paused:
            lines = paused.aiter_lines()
            first = await anext(lines)
            # Neither choice's generation waits for the client: both end while it reads nothing.
            assert await until(lambda: len(chat.generated) == 2, 30)
            rest = [line async for line in lines]
        chunks = [json.loads(line[6:]) for line in (first, *rest) if line.startswith("data: {")]
        for index in (0, 1):
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"] and c["choices"][0]["index"] == index) == ANSWER
        assert len(chunks) < 2 * FLOOD_DELTAS * 0.6


async def test_grpc_a_client_that_reads_nothing_for_the_stall_bound_has_its_stream_ended() -> None:
    chat = FloodChat(accept_any=True, stalled_client_s=0.3)  # the default buffer: 1 MiB, then its chat waits
    async with grpc_door(chat) as stub:
        stuck = await chat_call(stub, "flood")
        await stuck.read()
        assert await until(lambda: chat.stopped.is_set() and chat.admission.in_flight == 0, 20)
        assert not chat.generated  # ended before its answer was: upstream stopped too
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # reading again: what was sent, then the reason
            await read_all(stuck)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "took nothing of it for 0.3 s" in (caught.value.details() or "")
        status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
        info = error_details_pb2.ErrorInfo()
        assert status is not None and status.details[0].Unpack(info) and info.reason == "CLIENT_STALLED"


async def test_http_a_client_that_reads_nothing_for_the_stall_bound_has_its_stream_ended() -> None:
    chat = FloodChat(accept_any=True, stalled_client_s=0.3)
    async with http_door(chat) as (door, client):
        body = {"model": "flood", "messages": USER, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as stuck:
            lines = stuck.aiter_lines()
            await anext(lines)
            assert await until(lambda: door.app.in_flight == 0 and chat.admission.in_flight == 0, 20)
            assert chat.stopped.is_set() and not chat.generated
            rest: list[str] = []
            with pytest.raises(httpx2.RemoteProtocolError):  # what was sent, then the connection closed: no end
                async for line in lines:
                    rest.append(line)
        assert rest and "data: [DONE]" not in rest

"""The one request path of a chat, whichever protocol it came in on: the gRPC `Chat` (servicer.py) and the
OpenAI-compatible HTTP API (openai_api.py, http_server.py) both run `chat_events`.

It does what a chat needs whatever carried it: the request's form (the model reference, then `validate`), the
caller's credential (asked for only after the form, so a malformed request is INVALID_ARGUMENT with or without a
key), resolve, authorize, guardrails on the messages, render (`ChatService.prepare`), the response cache
(response_cache.py: a hit replays a stored answer in place of the generation), the generation with its output
screened (`ChatService.generate`, `Guardrails.screen_output`), and the call's span attributes. The
protocols only translate: their request into `ChatParams`, these events into their messages, their way of
cancelling into `cancel` (a gRPC `Cancel` message) or into cancelling the task that iterates (a gRPC stream
dropped, an HTTP client that disconnected): the generation upstream stops either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from lmesh.common.v1 import generation_pb2
from lmesh.policy.v1 import policy_pb2
from opentelemetry import trace

from services.common.errors import InvalidArgument, Reason, ResourceExhausted
from services.common.references import check_reference
from services.gateway.chat import (
    DEFAULT_MODEL,
    ChatDelta,
    ChatEnd,
    ChatParams,
    ChatService,
    Prepared,
    new_completion_id,
    validate,
)
from services.gateway.coalesce import coalesced
from services.gateway.credentials import Credential
from services.gateway.functions import calls_or_text, conversation_with
from services.gateway.mesh_tools import ToolPhaseResult, ToolStepEvent, add_usage
from services.gateway.response_cache import COMPLETE, Recorder, Result, replay
from services.gateway.screen import Screening


@dataclass(frozen=True)
class ChatStarted:
    """The first event: the request was authorized and rendered; the generation starts next."""

    model: str  # the concrete version that answers, `name:version`
    id: str  # `chatcmpl-` and 32 hex digits: also the span's gen_ai.response.id and inference's request id
    prompt_tokens: int
    response_cache: Result = "bypass"  # hit: answered from the response cache, no model runs; miss; bypass
    admitted: policy_pb2.ReserveResponse | None = None  # policy's admission (the key's limits and rate window)


ChatEvent = ChatStarted | ToolStepEvent | ChatDelta | ChatEnd
T = TypeVar("T")


@contextlib.asynccontextmanager
async def closing(events: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """`events` (an async generator typed as an iterator), closed when the block ends however it ends."""
    try:
        yield events
    finally:
        await _close(events)


def stalled_client(chat: ChatService) -> ResourceExhausted:
    """What a client that stopped reading is told, should it read again (no retry delay: waiting does not help)."""
    return ResourceExhausted(f"this stream was ended: its client took nothing of it for {chat.stalled_client_s:g} s "
                             "(it stopped reading)", reason=Reason.CLIENT_STALLED)


@contextlib.asynccontextmanager
async def started_while_admitting(prepared: Prepared, start: Callable[[int], AsyncIterator[T]],
                                  ) -> AsyncIterator[AsyncIterator[T]]:
    """The events of `start(priority)`, released only once policy admitted the chat (`prepared.admission`), and
    closed when the block ends.

    Where the admission is still deciding (an overlapped one, OverlappedAdmission), the first event is already
    being made (the engine prefills the prompt) while policy decides; a refusal cancels it and is raised, with
    nothing of the answer released. Where the key's priority cap changed within RecentPrincipals' memory, the
    answer is started again at the priority the admission allows."""
    priority = prepared.priority
    if not prepared.admission.done():
        events = start(priority)
        first = asyncio.ensure_future(_next(events))
        try:
            priority = prepared.confirmed_priority(await prepared.admission)
        except BaseException:
            await _cancelled(first)
            await _close(events)
            raise
        if priority == prepared.priority:
            async with closing(events), closing(_first_then_rest(first, events)) as released:
                yield released
            return
        await _cancelled(first)
        await _close(events)
    prepared.admission.result()  # raises a refusal
    async with closing(start(priority)) as events:
        yield events


async def _next(events: AsyncIterator[T]) -> tuple[T] | None:
    try:
        return (await anext(events),)
    except StopAsyncIteration:
        return None


async def _first_then_rest(first: asyncio.Future[tuple[T] | None], events: AsyncIterator[T]) -> AsyncIterator[T]:
    got = await first
    if got is None:
        return
    yield got[0]
    async for event in events:
        yield event


async def _cancelled(task: asyncio.Future[Any]) -> None:
    """`task` cancelled, and its cancellation run to the end (what it opened upstream is closed)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: superseded by what ends the chat


async def _close(events: AsyncIterator[Any]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


def reason_name(reason: generation_pb2.FinishReason.ValueType) -> str:
    """`stop`, `length`, `cancelled` or `content_filter`: the OpenTelemetry GenAI spelling of a finish reason."""
    return generation_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


async def chat_events(chat: ChatService, params: ChatParams, credential: Callable[[], Credential],
                      cancel: asyncio.Event, deadline_passed: Callable[[], bool] = lambda: False,
                      stalled: Callable[[], None] | None = None) -> AsyncGenerator[ChatEvent, None]:
    """One chat: ChatStarted, then ChatDelta events, then exactly one ChatEnd; or an LmeshError (or a relayed
    gRPC error) at any point. `params.model` may be empty (`default`); `credential` is called once the request's
    form is checked. Setting `cancel` ends the answer early with FINISH_REASON_CANCELLED; closing the iterator
    (or cancelling the task that iterates it) stops the generation upstream at once. The reservation policy made
    for the request is settled with what was used on every ending (`deadline_passed` tells a caller's deadline
    from its going away).

    The chat holds a place under the gateway's bound (`chat.admission`: RESOURCE_EXHAUSTED, GATEWAY_BUSY, beyond
    it) from its checked form until its last event is taken. Its events are read upstream as fast as they come;
    while the caller lags, deltas wait and merge (coalesce.py). A caller that takes nothing for
    `chat.stalled_client_s` gets `stalled` called once (it ends the stream its own protocol's way)."""
    span = trace.get_current_span()
    span.set_attribute("gen_ai.operation.name", "chat")
    # The model only once its form is checked (a span must not carry whatever a caller sent, megabytes
    # included); the numbers before theirs, so a request refused for one says what was asked.
    model = check_reference(params.model.strip() or DEFAULT_MODEL, "model")
    span.set_attributes({"gen_ai.request.model": model, "gen_ai.request.max_tokens": params.max_tokens,
                         "gen_ai.request.temperature": params.temperature})
    params = validate(replace(params, model=model))
    with chat.admission.admitted():
        async with closing(_admitted_chat(chat, params, credential, cancel, deadline_passed, stalled,
                                          span)) as events:
            try:
                async for event in events:
                    yield event
            except InvalidArgument as exc:
                raise named_as_sent(exc, params) from None


def named_as_sent(exc: InvalidArgument, params: ChatParams) -> InvalidArgument:
    """A replica's refusal of the constraint under the fields the caller sent: with functions to call, the
    constraint is the gateway's, made of the functions' parameter schemas and the response_format's JSON Schema."""
    calling = params.functions
    if calling is None or not calling.active or not exc.field.startswith("response_format."):
        return exc
    if params.response_format is None:
        return InvalidArgument("functions", exc.problem)
    return InvalidArgument("response_format.json_schema", f"{exc.problem} (compiled with the functions' schemas)")


async def _admitted_chat(chat: ChatService, params: ChatParams, credential: Callable[[], Credential],
                         cancel: asyncio.Event, deadline_passed: Callable[[], bool],
                         stalled: Callable[[], None] | None, span: trace.Span) -> AsyncGenerator[ChatEvent, None]:
    caller = credential()
    span.set_attribute("lmesh.credential", caller.kind)
    completion_id = new_completion_id()
    screening = Screening(request_id=completion_id)
    tool_phase: ToolPhaseResult | None = None
    if params.tools is not None:  # the mesh's tools first; their results join the conversation
        tool_phase = ToolPhaseResult(params)
        async with closing(chat.mesh_tools.run(chat, caller, params, completion_id, screening, cancel,
                                               tool_phase)) as steps:
            async for step in steps:
                yield step
        params = tool_phase.params
    calling = params.functions if params.functions is not None and params.functions.active else None
    if calling is not None:  # the functions described to the model, its answer constrained to text or calls
        answer_schema = params.response_format.json_schema if params.response_format is not None else None
        params = replace(params, messages=conversation_with(params.messages, calling),
                         response_format=calling.constraint(answer_schema))
    # A tool chat's answer is part of the request its plan's admission counted.
    continues = tool_phase.reservation_id if tool_phase is not None else ""
    prepared = await chat.prepare(caller, params, completion_id, screening, overlap=True, continues=continues)
    version = prepared.version
    model_id = f"{version.name}:{version.version}"
    span.set_attributes({"gen_ai.response.model": model_id, "gen_ai.response.id": completion_id,
                         "gen_ai.usage.input_tokens": len(prepared.prompt)})
    # The response cache, after authorization, input guardrails and the reservation (a hit is admitted and
    # charged as a miss), before the model: a hit replays the stored answer, a miss records its own.
    cache = chat.response_cache
    # Settled with what the meter saw on every ending: finish, cancel, client gone, deadline, error, a block.
    # The streams are closed here, in order, whatever ends the loop: the inference and detokenizer streams are
    # cut before this generator returns, not whenever the garbage collector finds them.
    async with chat.accounts.held(prepared.admission, deadline_passed) as meter:
        plan = cache.plan(params, prepared.tenant, model_id, prepared.prompt)
        hit = await cache.lookup(plan)  # inside: a client that leaves meanwhile still has its reservation settled
        cache_result: Result = "hit" if hit is not None else plan.result_if_missed
        recorder = Recorder(meter)

        def answer(priority: int) -> AsyncIterator[ChatDelta | ChatEnd]:
            nonlocal recorder
            if hit is not None:
                return replay(hit, meter, cancel)
            generated = chat.generate(version, prepared.prompt, prepared.max_tokens, params, cancel, completion_id,
                                      prepared.tokenizer, meter, priority=priority, placement=prepared.placement)
            recorder = Recorder(meter)  # an answer started again is recorded from its start
            return recorder.record(generated) if plan.write else generated

        # With an overlapped admission the answer starts upstream now and waits for policy here; nothing of it,
        # not even ChatStarted, goes out before the admission.
        async with started_while_admitting(prepared, answer) as source, \
                closing(chat.guardrails.screen_output(screening, source, cancel, params.logprobs)) as checked, \
                closing(calls_or_text(checked, calling, cancel.set) if calling is not None else checked) as screened:
            cache.count(cache_result, model_id)
            span.set_attribute("lmesh.response_cache", cache_result)
            yield ChatStarted(model_id, completion_id, len(prepared.prompt), cache_result, prepared.admission.result())
            async with coalesced(screened, chat.stalled_client_s, stalled, chat.stream_buffer_bytes) as buffered:
                async for event in buffered:
                    if isinstance(event, ChatEnd):
                        if recorder.answer is not None and event.finish_reason in COMPLETE:  # not blocked by screening
                            cache.store(plan, recorder.answer)
                        if tool_phase is not None:  # the plan's tokens count too
                            event = replace(event, usage=add_usage(event.usage, tool_phase.usage))
                        usage = event.usage  # inference's, relayed as it came: the same shared type
                        span.set_attributes({"gen_ai.usage.output_tokens": usage.completion_tokens,
                                             "gen_ai.response.finish_reasons": [reason_name(event.finish_reason)],
                                             "lmesh.usage.cached_prompt_tokens": usage.cached_prompt_tokens})
                    yield event

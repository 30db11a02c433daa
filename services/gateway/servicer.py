"""Gateway gRPC servicer: the public Chat and ListModels, converting between the public API and the request path
(request_path.chat_events, which the OpenAI-compatible HTTP API runs too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.embeddings.v1 import embeddings_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from opentelemetry import trace

from services.common.rpc import abort_elsewhere, first_message
from services.gateway.accounting import rate_limit_headers
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams, ChatService
from services.gateway.credentials import caller_credential
from services.gateway.functions import FunctionCalling, call_turn, result_turn
from services.gateway.logprobs import TokenLogprob
from services.gateway.mesh_tools import ToolRequest, ToolStepEvent
from services.gateway.request_path import chat_events, stalled_client
from services.gateway.tool_graph import CallStarted


def _messages(messages: Sequence[gateway_pb2.Message]) -> list[tuple[str, str]]:
    """The conversation as the model reads it: function calls and their results (role `tool`) as text."""
    names: dict[str, str] = {}
    turns = []
    for message in messages:
        if message.function_calls:
            names.update((call.id, call.name) for call in message.function_calls)
            written = call_turn([(call.name, call.arguments_json) for call in message.function_calls])
            turns.append((message.role, f"{message.content}\n{written}" if message.content else written))
        elif message.role == "tool":
            turns.append(("user", result_turn(names.get(message.function_call_id, ""), message.function_call_id,
                                              message.content)))
        else:
            turns.append((message.role, message.content))
    return turns


def _params(start: gateway_pb2.ChatStart) -> ChatParams:
    functions = (FunctionCalling.checked([(f.name, f.description, f.parameters_json) for f in start.functions],
                                         start.function_choice, not start.single_function_call)
                 if start.functions or start.function_choice else None)
    return ChatParams(
        model=start.model,
        messages=_messages(start.messages),
        functions=functions,
        max_tokens=start.max_tokens, temperature=start.temperature, top_p=start.top_p, top_k=start.top_k,
        seed=start.seed, repetition_penalty=start.repetition_penalty, stop=list(start.stop),
        logprobs=start.logprobs, top_logprobs=start.top_logprobs, session=start.session,
        priority=start.priority if start.HasField("priority") else None,
        cache_read=not start.no_cache, cache_store=not start.no_cache,
        tools=ToolRequest(auto=start.tools.auto, names=tuple(start.tools.names), max_calls=start.tools.max_calls,
                          call_timeout_ms=start.tools.call_timeout_ms, candidates=start.tools.candidates)
        if start.HasField("tools") else None,
        response_format=start.response_format if start.HasField("response_format") else None,
        presence_penalty=start.presence_penalty, frequency_penalty=start.frequency_penalty,
        logit_bias=tuple(sorted(start.logit_bias.items())),
    )


def tool_step(event: ToolStepEvent) -> gateway_pb2.ToolStep:
    step = event.step
    message = gateway_pb2.ToolStep(call=step.number, tool=step.tool,
                                   arguments_json=json.dumps(step.arguments, ensure_ascii=False))
    if isinstance(step, CallStarted):
        message.state = gateway_pb2.ToolStep.STATE_STARTED
        return message
    message.latency_ms = round(step.latency_s * 1000)
    if step.result is not None:
        message.state = gateway_pb2.ToolStep.STATE_SUCCEEDED
        message.result_json = json.dumps(step.result, ensure_ascii=False)
    else:
        assert step.failure is not None
        message.state = gateway_pb2.ToolStep.STATE_FAILED
        message.error_code, message.error_message = step.failure.code, step.failure.message
    return message


def _logprobs(entries: list[TokenLogprob]) -> list[generation_pb2.TokenLogprob]:
    def text(data: bytes) -> str:
        return data.decode("utf-8", errors="replace")  # part of a character shows as U+FFFD

    return [generation_pb2.TokenLogprob(
        token=text(e.chosen.data), bytes=e.chosen.data, token_id=e.chosen.token_id, logprob=e.chosen.logprob,
        top_logprobs=[generation_pb2.TopLogprob(token=text(a.data), bytes=a.data, token_id=a.token_id,
                                                logprob=a.logprob) for a in e.top],
    ) for e in entries]


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def Chat(self, request_iterator: AsyncIterator[gateway_pb2.ChatRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.ChatResponse]:
        start = await first_message(request_iterator, "start")
        cancel = asyncio.Event()

        async def watch_client() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                async for message in request_iterator:
                    if message.WhichOneof("kind") == "cancel":
                        cancel.set()
                        return

        handler = asyncio.current_task()
        aborting: list[asyncio.Task[None]] = []

        def stalled() -> None:  # the handler is stuck in a write: the call is ended from outside
            aborting.append(asyncio.create_task(abort_elsewhere(context, stalled_client(self._chat), handler)))

        watcher: asyncio.Task[None] | None = None
        model_id = completion_id = ""
        first_delta = True
        try:
            async with contextlib.aclosing(chat_events(self._chat, _params(start), lambda: caller_credential(context),
                                                       cancel, lambda: _deadline_passed(context),
                                                       stalled)) as events:
                async for event in events:
                    if isinstance(event, ToolStepEvent):
                        response = gateway_pb2.ChatResponse(tool_step=tool_step(event))
                        if first_delta:
                            response.model, response.id = event.model, event.id
                            first_delta = False
                            if rate := rate_limit_headers(event.admitted):  # the plan admitted the chat
                                await context.send_initial_metadata(rate)
                        if watcher is None:  # a Cancel message stops the tool phase too
                            watcher = asyncio.create_task(watch_client())
                        yield response
                    elif isinstance(event, ChatDelta):
                        response = gateway_pb2.ChatResponse(delta=event.text, logprobs=_logprobs(event.logprobs))
                        if first_delta:
                            response.model, response.id = model_id, completion_id
                            first_delta = False
                        yield response
                    elif isinstance(event, ChatEnd):
                        yield gateway_pb2.ChatResponse(
                            finish_reason=event.finish_reason, usage=event.usage, model=model_id, id=completion_id,
                            logprobs=_logprobs(event.logprobs),
                            function_calls=[gateway_pb2.FunctionCall(id=c.id, name=c.name, arguments_json=c.arguments)
                                            for c in event.function_calls])
                    else:  # ChatStarted: from here on a Cancel message stops the generation
                        model_id, completion_id = event.model, event.id
                        if first_delta and (rate := rate_limit_headers(event.admitted)):  # nothing sent yet
                            await context.send_initial_metadata(rate)
                        if watcher is None:
                            watcher = asyncio.create_task(watch_client())
        finally:
            if watcher is not None:
                watcher.cancel()

    async def Embed(self, request: embeddings_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> embeddings_pb2.EmbedResponse:
        credential = caller_credential(context)
        trace.get_current_span().set_attribute("lmesh.credential", credential.kind)
        return await self._chat.embed(credential, request)

    async def ListModels(self, request: gateway_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> gateway_pb2.ListModelsResponse:
        credential = caller_credential(context)
        trace.get_current_span().set_attribute("lmesh.credential", credential.kind)
        versions = await self._chat.list_models(credential)
        served = await self._chat.served_models()
        return gateway_pb2.ListModelsResponse(models=[
            gateway_pb2.ModelInfo(id=f"{v.name}:{v.version}", name=v.name, version=v.version,
                                  aliases=list(v.aliases), context_length=v.context_length,
                                  served=f"{v.name}:{v.version}" in served)
            for v in versions
        ])

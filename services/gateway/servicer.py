"""Gateway gRPC servicer: the public Chat and ListModels, converting between the public API and the request path
(request_path.chat_events, which the OpenAI-compatible HTTP API runs too)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from opentelemetry import trace

from services.common.rpc import abort_elsewhere, first_message
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams, ChatService
from services.gateway.credentials import caller_credential
from services.gateway.logprobs import TokenLogprob
from services.gateway.request_path import chat_events, stalled_client


def _params(start: gateway_pb2.ChatStart) -> ChatParams:
    return ChatParams(
        model=start.model,
        messages=[(m.role, m.content) for m in start.messages],
        max_tokens=start.max_tokens, temperature=start.temperature, top_p=start.top_p, top_k=start.top_k,
        seed=start.seed, repetition_penalty=start.repetition_penalty, stop=list(start.stop),
        logprobs=start.logprobs, top_logprobs=start.top_logprobs, session=start.session,
        priority=start.priority if start.HasField("priority") else None,
        cache_read=not start.no_cache, cache_store=not start.no_cache,
    )


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
                    if isinstance(event, ChatDelta):
                        response = gateway_pb2.ChatResponse(delta=event.text, logprobs=_logprobs(event.logprobs))
                        if first_delta:
                            response.model, response.id = model_id, completion_id
                            first_delta = False
                        yield response
                    elif isinstance(event, ChatEnd):
                        yield gateway_pb2.ChatResponse(finish_reason=event.finish_reason, usage=event.usage,
                                                       model=model_id, id=completion_id,
                                                       logprobs=_logprobs(event.logprobs))
                    else:  # ChatStarted: from here on a Cancel message stops the generation
                        model_id, completion_id = event.model, event.id
                        watcher = asyncio.create_task(watch_client())
        finally:
            if watcher is not None:
                watcher.cancel()

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

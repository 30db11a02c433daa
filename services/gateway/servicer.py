"""Gateway gRPC servicer: the public Chat and ListModels, converting between the public API and ChatService."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from opentelemetry import trace

from services.common.references import check_reference
from services.common.rpc import first_message
from services.gateway.chat import (
    DEFAULT_MODEL,
    ChatDelta,
    ChatEnd,
    ChatParams,
    ChatService,
    new_completion_id,
    validate,
)
from services.gateway.credentials import caller_credential
from services.gateway.logprobs import TokenLogprob
from services.gateway.screen import Screening


def _params(start: gateway_pb2.ChatStart, model: str) -> ChatParams:
    return validate(ChatParams(
        model=model,
        messages=[(m.role, m.content) for m in start.messages],
        max_tokens=start.max_tokens, temperature=start.temperature, top_p=start.top_p, top_k=start.top_k,
        seed=start.seed, repetition_penalty=start.repetition_penalty, stop=list(start.stop),
        logprobs=start.logprobs, top_logprobs=start.top_logprobs,
    ))


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _reason_name(reason: generation_pb2.FinishReason.ValueType) -> str:
    """`stop`, `length`, `cancelled` or `content_filter`: the OpenTelemetry GenAI spelling of a finish reason."""
    return generation_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def _logprobs(entries: list[TokenLogprob]) -> list[generation_pb2.TokenLogprob]:
    def text(data: bytes) -> str:
        return data.decode("utf-8", errors="replace")  # part of a character shows as U+FFFD

    return [generation_pb2.TokenLogprob(
        token=text(e.chosen.data), bytes=e.chosen.data, token_id=e.chosen.token_id, logprob=e.chosen.logprob,
        top_logprobs=[generation_pb2.TopLogprob(token=text(a.data), bytes=a.data, token_id=a.token_id,
                                                logprob=a.logprob) for a in e.top],
    ) for e in entries]


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def Chat(self, request_iterator: AsyncIterator[gateway_pb2.ChatRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.ChatResponse]:
        start = await first_message(request_iterator, "start")
        span = trace.get_current_span()
        span.set_attribute("gen_ai.operation.name", "chat")
        # The model only once its form is checked (a span must not carry whatever a caller sent, megabytes
        # included); the numbers before theirs, so a request refused for one says what was asked.
        model = check_reference(start.model.strip() or DEFAULT_MODEL, "model")
        span.set_attributes({"gen_ai.request.model": model, "gen_ai.request.max_tokens": start.max_tokens,
                             "gen_ai.request.temperature": start.temperature})
        params = _params(start, model)
        credential = caller_credential(context)
        span.set_attribute("lmesh.credential", credential.kind)
        completion_id = new_completion_id()
        screening = Screening(request_id=completion_id)
        prepared = await self._chat.prepare(credential, params, completion_id, screening)
        version = prepared.version
        model_id = f"{version.name}:{version.version}"
        span.set_attributes({"gen_ai.response.model": model_id, "gen_ai.response.id": completion_id,
                             "gen_ai.usage.input_tokens": len(prepared.prompt)})

        cancel = asyncio.Event()

        async def watch_client() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                async for message in request_iterator:
                    if message.WhichOneof("kind") == "cancel":
                        cancel.set()
                        return

        watcher = asyncio.create_task(watch_client())
        first_delta = True
        # Settled with what the meter saw on every ending: finish, cancel, client gone, deadline, error, a block.
        async with self._chat.accounts.held(prepared.reservation, lambda: _deadline_passed(context)) as meter:
            try:
                events = self._chat.generate(version, prepared.prompt, prepared.max_tokens, params, cancel,
                                             completion_id, prepared.tokenizer, meter)
                async for event in self._chat.guardrails.screen_output(screening, events, cancel, params.logprobs):
                    if isinstance(event, ChatDelta):
                        response = gateway_pb2.ChatResponse(delta=event.text, logprobs=_logprobs(event.logprobs))
                        if first_delta:
                            response.model, response.id = model_id, completion_id
                            first_delta = False
                        yield response
                    elif isinstance(event, ChatEnd):
                        usage = event.usage  # inference's, relayed as it came: the same shared type
                        span.set_attributes({"gen_ai.usage.output_tokens": usage.completion_tokens,
                                             "gen_ai.response.finish_reasons": [_reason_name(event.finish_reason)],
                                             "lmesh.usage.cached_prompt_tokens": usage.cached_prompt_tokens})
                        yield gateway_pb2.ChatResponse(finish_reason=event.finish_reason, usage=usage,
                                                       model=model_id, id=completion_id,
                                                       logprobs=_logprobs(event.logprobs))
            finally:
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

"""Inference gRPC servicer: validates a Generate stream, hands it to the engine, streams its events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from opentelemetry import trace

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Reason
from services.common.rpc import first_message
from services.inference.constrained import CompiledConstraint, ConstraintSpec, Grammars
from services.inference.engine import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Engine,
    ErrorEvent,
    Finish,
    FinishEvent,
    GenerationRequest,
    Sequence,
    TokenEvent,
)
from services.inference.metrics import GAP_BATCH, InferenceMetrics
from services.inference.sampling import MAX_TOP_LOGPROBS, SamplingConfig

# A caller's request id is a label for traces, not a payload.
MAX_REQUEST_ID = 128

_FINISH_REASONS = {
    Finish.STOP: generation_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
}


@dataclass
class ServedModel:
    name: str
    version: str
    engine: Engine
    vocab_size: int
    context_length: int
    # Compiles output constraints for this version's tokenizer; None when it was registered without one.
    grammars: Grammars | None = None

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"


def _validate(start: inference_pb2.GenerateStart, model: ServedModel, deadline: float | None) -> GenerationRequest:
    prompt = list(start.prompt_token_ids)
    if not prompt:
        raise InvalidArgument("prompt_token_ids", "must not be empty")
    if len(prompt) >= model.context_length:
        raise InvalidArgument("prompt_token_ids",
                              f"{len(prompt)} tokens do not fit the model's context of {model.context_length}")
    if min(prompt) < 0 or max(prompt) >= model.vocab_size:
        raise InvalidArgument("prompt_token_ids", f"ids must be in [0, {model.vocab_size})")
    if start.max_tokens <= 0:
        raise InvalidArgument("max_tokens", f"must be > 0, got {start.max_tokens}")
    if any(not 0 <= t < model.vocab_size for t in start.stop_token_ids):
        raise InvalidArgument("stop_token_ids", f"ids must be in [0, {model.vocab_size})")
    if len(start.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID} characters, got {len(start.request_id)}")
    if not 0 <= start.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {start.top_logprobs}")
    if not MIN_PRIORITY <= start.priority <= MAX_PRIORITY:
        raise InvalidArgument("priority", f"must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {start.priority}")
    s = start.sampling
    sampling = SamplingConfig.validated(s.temperature, s.top_p, s.top_k, s.seed, s.repetition_penalty,
                                        model.vocab_size, presence_penalty=s.presence_penalty,
                                        frequency_penalty=s.frequency_penalty, logit_bias=s.logit_bias)
    return GenerationRequest(prompt_ids=prompt, max_tokens=start.max_tokens, sampling=sampling,
                             stop_ids=frozenset(start.stop_token_ids), top_logprobs=start.top_logprobs,
                             request_id=start.request_id, deadline=deadline, priority=start.priority)


async def _constraint(start: inference_pb2.GenerateStart, model: ServedModel) -> CompiledConstraint | None:
    """The request's output constraint, compiled (INVALID_ARGUMENT naming `constraint.<kind>` if it cannot be)."""
    kind = start.constraint.WhichOneof("kind") if start.HasField("constraint") else None
    if kind is None:
        return None
    if model.grammars is None:
        raise FailedPrecondition(f"model '{model.id}' was registered without a tokenizer artifact: its output "
                                 f"cannot be constrained", metadata={"model": model.id})
    return await model.grammars.compile_async(ConstraintSpec(kind, getattr(start.constraint, kind)))


async def _until_retired(seq: Sequence, timeout_s: float = 5.0) -> None:
    """Waits (bounded) until the engine has let a cancelled sequence go; its events are no longer read."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while not seq.done:
                await seq.events.get()


def _token_message(event: TokenEvent) -> generation_pb2.TokenLogprob:
    sampled = event.sampled
    return generation_pb2.TokenLogprob(
        token_id=sampled.token_id, logprob=sampled.logprob,
        top_logprobs=[generation_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in sampled.top],
    )


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, models: dict[str, ServedModel], tracer: trace.Tracer, metrics: InferenceMetrics) -> None:
        self._models = models
        self._tracer = tracer
        self._metrics = metrics

    async def Generate(self, request_iterator: AsyncIterator[inference_pb2.GenerateRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateResponse]:
        start = await first_message(request_iterator, "start")
        if not start.model:
            raise InvalidArgument("model", "must not be empty")
        model = self._models.get(start.model)
        if model is None:
            raise NotFound(f"model '{start.model}' is not served here (serving: {', '.join(self._models)})",
                           reason=Reason.MODEL_NOT_SERVED, metadata={"model": start.model})
        remaining = context.time_remaining()
        request = _validate(start, model, None if remaining is None else time.monotonic() + remaining)
        constraint = await _constraint(start, model)
        if constraint is not None:
            request = dataclasses.replace(request, constraint=constraint)
        span = trace.get_current_span()
        span.set_attributes({"gen_ai.request.model": model.id, "gen_ai.usage.input_tokens": len(request.prompt_ids),
                             "gen_ai.request.max_tokens": request.max_tokens,
                             "lmesh.inference.priority": request.priority})
        if constraint is not None:
            span.set_attribute("lmesh.inference.constraint", constraint.spec.kind)
        if request.request_id:
            span.set_attribute("lmesh.request_id", request.request_id)
        engine = model.engine
        seq = engine.submit(request)
        watcher = asyncio.create_task(self._watch_cancel(request_iterator, engine, seq))
        try:
            async for message in self._stream(seq):
                yield message
                if len(seq.token_gaps_ns) >= GAP_BATCH:  # a long answer's gaps show before it ends
                    self._metrics.record_gaps(model.id, seq)
        finally:
            watcher.cancel()
            engine.cancel(seq)  # a dropped stream frees the sequence; no-op when it already ended
            await _until_retired(seq)  # so the spans count the token of the step that was in flight
            self._record_spans(seq, span)
            self._metrics.record(model.id, seq)

    @staticmethod
    async def _watch_cancel(request_iterator: AsyncIterator[inference_pb2.GenerateRequest], engine: Engine,
                            seq: Sequence) -> None:
        # Half-closing is not a cancel: only an explicit cancel message (or a dropped stream) is.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for message in request_iterator:
                if message.WhichOneof("kind") == "cancel":
                    engine.cancel(seq)
                    return

    async def _stream(self, seq: Sequence) -> AsyncIterator[inference_pb2.GenerateResponse]:
        while True:
            event = await seq.events.get()
            tokens: list[generation_pb2.TokenLogprob] = []
            # Coalesce tokens that piled up while the client was slow into one message.
            while isinstance(event, TokenEvent):
                tokens.append(_token_message(event))
                if seq.events.empty():
                    break
                event = seq.events.get_nowait()
            if tokens:
                yield inference_pb2.GenerateResponse(tokens=inference_pb2.TokenChunk(tokens=tokens))
                if isinstance(event, TokenEvent):
                    continue
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, FinishEvent):
                yield inference_pb2.GenerateResponse(finish=inference_pb2.GenerateFinish(
                    reason=_FINISH_REASONS[event.reason],
                    usage=generation_pb2.Usage(prompt_tokens=event.prompt_tokens,
                                               completion_tokens=event.completion_tokens,
                                               total_tokens=event.prompt_tokens + event.completion_tokens,
                                               cached_prompt_tokens=event.cached_prompt_tokens),
                ))
                return

    def _record_spans(self, seq: Sequence, parent: trace.Span) -> None:
        """Prefill and decode spans from the engine's timestamps (the engine itself knows no tracing)."""
        context = trace.set_span_in_context(parent)
        parent.set_attributes({"gen_ai.usage.output_tokens": seq.completion_tokens,
                               "lmesh.inference.prefix_cached_tokens": seq.cached_tokens,
                               "lmesh.inference.tokens_after_cancel": seq.tokens_after_cancel,
                               "lmesh.inference.cancelled": seq.tokens_at_cancel is not None})
        if seq.prefill_start_ns:
            queue = self._tracer.start_span("queue", context=context, start_time=seq.enqueued_ns)
            queue.end(end_time=seq.prefill_start_ns)
            prefill = self._tracer.start_span("prefill", context=context, start_time=seq.prefill_start_ns,
                                              attributes={"gen_ai.usage.input_tokens": len(seq.request.prompt_ids),
                                                          "lmesh.inference.prefix_cached_tokens": seq.cached_tokens,
                                                          "lmesh.inference.prefix_cache_hit": seq.cached_tokens > 0})
            prefill.end(end_time=seq.prefill_end_ns)
            decode = self._tracer.start_span("decode", context=context, start_time=seq.prefill_end_ns,
                                             attributes={"gen_ai.usage.output_tokens": seq.completion_tokens})
            decode.end(end_time=max(seq.finish_ns, seq.prefill_end_ns))

"""One chat request through the mesh: authorize, resolve, template, generate, detokenize, stop strings.

The token path is pipelined: one task forwards token ids from inference to the tokenizer's
DetokenizeStream while the caller reads text deltas from it, so no hop waits on another per token.
Per-token logprobs ride along: chunk i's entries are matched with the detokenizer's response i.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from lmesh.common.v1 import generation_pb2
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from lmesh.registry.v1 import registry_pb2
from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from opentelemetry import trace

from services.common.access import version_allowed
from services.common.discovery import Endpoint, Mesh
from services.common.errors import InvalidArgument, LmeshError, Unauthenticated, Unavailable
from services.common.rpc import call_options, mark_failed
from services.gateway.logprobs import MAX_TOP_LOGPROBS, AnswerAssembler, TokenLogprob, VocabularyCache
from services.gateway.models import ModelDirectory

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4
MAX_STOP_CHARS = 64
DEFAULT_MODEL = "default"

# Codes with which an inference replica refuses a request before producing anything.
RETRY_ELSEWHERE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class ChatParams:
    model: str
    messages: list[tuple[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    repetition_penalty: float
    stop: list[str]
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class ChatDelta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ChatEnd:
    finish_reason: generation_pb2.FinishReason.ValueType
    usage: generation_pb2.Usage  # inference's, every field set (its prompt is the rendered one)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def validate(params: ChatParams) -> ChatParams:
    if not params.messages:
        raise InvalidArgument("messages", "must not be empty")
    for index, (role, _) in enumerate(params.messages):
        if role not in ROLES:
            raise InvalidArgument(f"messages[{index}].role", f"must be one of {', '.join(ROLES)}, got '{role}'")
    if params.max_tokens <= 0:
        raise InvalidArgument("max_tokens", f"must be > 0, got {params.max_tokens}")
    if not np.isfinite(params.temperature) or not 0.0 <= params.temperature <= 2.0:
        raise InvalidArgument("temperature", f"must be in [0, 2], got {params.temperature}")
    if not np.isfinite(params.top_p) or not 0.0 <= params.top_p <= 1.0:
        raise InvalidArgument("top_p", f"must be in (0, 1] (0 means off), got {params.top_p}")
    if params.top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 0, got {params.top_k}")
    if not np.isfinite(params.repetition_penalty) or not 0.0 <= params.repetition_penalty <= 2.0:
        raise InvalidArgument("repetition_penalty", f"must be in (0, 2] (0 means off), got {params.repetition_penalty}")
    if len(params.stop) > MAX_STOPS:
        raise InvalidArgument("stop", f"at most {MAX_STOPS} stop strings, got {len(params.stop)}")
    for index, stop in enumerate(params.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"stop[{index}]", f"must be 1 to {MAX_STOP_CHARS} characters")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")
    if params.top_logprobs and not params.logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs set to true")
    return params


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")


def allowed(principal: policy_pb2.Principal, version: registry_pb2.ModelVersion) -> bool:
    """The policy service's rule (services.common.access), so ListModels shows what Authorize allows."""
    return version_allowed(principal.allowed_models, f"{version.name}:{version.version}", version.aliases)


class ChatService:
    """The gateway's domain: every upstream call of a chat, and the flow between them."""

    def __init__(self, mesh: Mesh, tracer: trace.Tracer) -> None:
        self._policy = mesh.resolver("lmesh-policy")
        self._tokenizer = mesh.resolver("lmesh-tokenizer")
        self._inference = mesh.resolver("lmesh-inference")
        self.models = ModelDirectory(mesh.resolver("lmesh-registry"))
        self.vocabularies = VocabularyCache(self._tokenizer)
        self._tracer = tracer

    async def authenticate(self, api_key: str) -> policy_pb2.Principal:
        response = await self._policy.call(policy_pb2_grpc.PolicyStub, "Authenticate",
                                           policy_pb2.AuthenticateRequest(api_key=api_key), timeout=10)
        return response.principal

    async def list_models(self, api_key: str) -> list[registry_pb2.ModelVersion]:
        principal = await self.authenticate(api_key)
        return [m for m in await self.models.list() if allowed(principal, m)]

    async def served_models(self) -> set[str]:
        """The `name:version`s that at least one passing inference replica serves now (Consul meta `models`)."""
        return {model for endpoint in await self._inference.passing() for model in endpoint.models}

    async def prepare(self, api_key: str, params: ChatParams,
                      ) -> tuple[registry_pb2.ModelVersion, list[int], int, Endpoint]:
        """Resolves the model, authorizes the key for the model it resolved to, then renders the prompt; returns
        version, ids, max_tokens and the tokenizer that rendered it (which has that model's tokenizer loaded)."""
        with self._tracer.start_as_current_span("authorize", record_exception=False,
                                                 set_status_on_exception=False) as span:
            try:
                try:
                    version = await self.models.resolve(params.model)  # cached: usually no call
                except (LmeshError, grpc.aio.AioRpcError):
                    # Authentication errors win over NOT_FOUND and the rest: no model probing without a key.
                    await self._policy.call(policy_pb2_grpc.PolicyStub, "Authenticate",
                                            policy_pb2.AuthenticateRequest(api_key=api_key), timeout=10)
                    raise
                model_id = f"{version.name}:{version.version}"
                # On the model behind the reference, so an alias (`default`) grants exactly what its model does.
                await self._policy.call(policy_pb2_grpc.PolicyStub, "Authorize", policy_pb2.AuthorizeRequest(
                    api_key=api_key, model=params.model, max_tokens=params.max_tokens, resolved_model=model_id,
                    resolved_aliases=list(version.aliases)), timeout=10)
            except Exception as exc:
                mark_failed(span, exc)
                raise
        if len(params.messages) > version.context_length:
            # Every turn renders to at least one token: this many cannot fit, and rendering them (seconds for
            # hundreds of thousands of empty turns) would only find that out.
            raise InvalidArgument("messages", f"{len(params.messages)} messages cannot fit the model's context of "
                                              f"{version.context_length} tokens")
        request = tokenizer_pb2.ApplyChatTemplateRequest(
            model=model_id, add_generation_prompt=True,
            messages=[tokenizer_pb2.ChatMessage(role=r, content=c) for r, c in params.messages])

        async def render(endpoint: Endpoint) -> tuple[tokenizer_pb2.ApplyChatTemplateResponse, Endpoint]:
            stub = endpoint.stub(tokenizer_pb2_grpc.TokenizerStub)
            return await stub.ApplyChatTemplate(request, **call_options(timeout=10)), endpoint

        rendered, tokenizer = await self._tokenizer.with_endpoint(render)
        prompt = list(rendered.token_ids)
        context = version.context_length
        if len(prompt) >= context:
            raise InvalidArgument("messages", f"the prompt is {len(prompt)} tokens; the model's context is {context}")
        return version, prompt, min(params.max_tokens, context - len(prompt)), tokenizer

    async def generate(self, version: registry_pb2.ModelVersion, prompt: list[int], max_tokens: int,
                       params: ChatParams, cancel: asyncio.Event, request_id: str = "",
                       tokenizer: Endpoint | None = None) -> AsyncIterator[ChatDelta | ChatEnd]:
        """Streams the answer. `tokenizer`: the instance that rendered the prompt, which detokenizes it too: it
        holds the model's tokenizer, where another passing one may not (started while the registry was down)."""
        model_id = f"{version.name}:{version.version}"
        # Fetched once per model version; later requests find it cached.
        vocabulary = await self.vocabularies.get(model_id) if params.logprobs else None
        refused: set[str] = set()  # replicas that refused this request before its first token

        def candidate(e: Endpoint) -> bool:
            return model_id in e.models and e.service_id not in refused

        endpoint = await self._inference.pick(
            candidate, none_match=f"no inference replica serves {model_id}; start one with "
                                  f"`lmesh serve inference --model {model_id}`")
        generate_call = endpoint.stub(inference_pb2_grpc.InferenceStub).Generate(**call_options())
        start = inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
            model=model_id, prompt_token_ids=prompt, max_tokens=max_tokens,
            sampling=inference_pb2.SamplingParams(
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                repetition_penalty=params.repetition_penalty),
            top_logprobs=params.top_logprobs, request_id=request_id))
        if tokenizer is None or tokenizer.service_id not in {e.service_id for e in self._tokenizer.endpoints()}:
            tokenizer = await self._tokenizer.pick()
        detokenize_call = tokenizer.stub(tokenizer_pb2_grpc.TokenizerStub).DetokenizeStream(**call_options())
        answer = AnswerAssembler(params.stop, vocabulary)
        finish: list[inference_pb2.GenerateFinish] = []
        cancel_sent = asyncio.Event()
        # One write at a time on the inference stream (grpc refuses a second while one is pending), and the cancel
        # only after a start: a cancel arriving right behind the start must not race it.
        start_written = asyncio.Event()
        write_lock = asyncio.Lock()

        async def send_cancel() -> None:
            if not cancel_sent.is_set():
                cancel_sent.set()
                await start_written.wait()
                async with write_lock:
                    with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                        await send(generate_call, inference_pb2.GenerateRequest(
                            cancel=inference_pb2.CancelGeneration()))

        async def watch_cancel() -> None:
            await cancel.wait()
            await send_cancel()

        async def pump() -> None:
            """inference → tokenizer, as tokens arrive."""
            nonlocal endpoint, generate_call
            admitted = False
            while True:
                try:
                    async with write_lock:
                        await send(generate_call, start)
                    start_written.set()
                    async for response in generate_call:
                        admitted = True
                        if response.HasField("tokens"):
                            ids = [t.token_id for t in response.tokens.tokens]
                            answer.add_chunk(response.tokens.tokens)  # first: the detokenizer may answer at once
                            await send(detokenize_call, tokenizer_pb2.DetokenizeStreamRequest(
                                tokens=tokenizer_pb2.TokenIds(token_ids=ids)))
                        elif response.HasField("finish"):
                            finish.append(response.finish)
                    break
                except grpc.aio.AioRpcError as exc:
                    # Refused before generating anything (its queue is full, or it is gone or draining, which
                    # Consul has not told us yet): the request can go to another replica as if new.
                    if admitted or exc.code() not in RETRY_ELSEWHERE or cancel_sent.is_set():
                        raise
                    refused.add(endpoint.service_id)
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self._inference.mark_down(endpoint)
                    try:
                        other = await self._inference.pick(candidate)
                    except Unavailable:
                        raise exc from None
                    endpoint.outstanding -= 1
                    endpoint, generate_call = other, other.stub(inference_pb2_grpc.InferenceStub).Generate(
                        **call_options())
                    endpoint.outstanding += 1
            await detokenize_call.done_writing()

        endpoint.outstanding += 1
        tasks: list[asyncio.Task[None]] = []
        try:
            await send(detokenize_call, tokenizer_pb2.DetokenizeStreamRequest(
                start=tokenizer_pb2.DetokenizeStart(model=model_id, skip_special_tokens=True)))
            tasks = [asyncio.create_task(pump()), asyncio.create_task(watch_cancel())]
            pump_task = tasks[0]
            # A failed pump (inference died) cuts the detokenizer stream so the read below ends at once.
            pump_task.add_done_callback(
                lambda t: detokenize_call.cancel() if not t.cancelled() and t.exception() else None)
            try:
                async for piece in detokenize_call:
                    text, entries = answer.piece(piece.delta, piece.final)
                    if text:
                        yield ChatDelta(text, entries)
                    if answer.stopped:
                        await send_cancel()
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
                failure = pump_task.exception() if pump_task.done() and not pump_task.cancelled() else None
                if failure is not None:
                    raise failure from None
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # The detokenizer's stream broke, not inference's.
                    self._tokenizer.mark_down(tokenizer)
                    raise Unavailable(f"tokenizer {tokenizer.target} became unavailable: {exc.details()}") from exc
                raise
            await pump_task  # re-raises an inference failure (e.g. UNAVAILABLE when the replica died)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._inference.mark_down(endpoint)
                raise Unavailable(f"inference replica {endpoint.target} became unavailable: {exc.details()}") from exc
            raise
        finally:
            endpoint.outstanding -= 1
            for task in tasks:
                task.cancel()
            generate_call.cancel()
            detokenize_call.cancel()
        if not finish:
            raise Unavailable("the inference stream ended without a finish message")
        if not finish[0].HasField("usage"):
            # Its tokens, too, came in a field this gateway no longer reads (inference.proto's reserved numbers).
            raise Unavailable(f"inference replica {endpoint.target} sent no usage: it runs an lmesh older than this "
                              "gateway's lmesh.common.v1 types; upgrade it")
        reason = generation_pb2.FINISH_REASON_STOP if answer.stopped else finish[0].reason
        yield ChatEnd(reason, finish[0].usage, answer.rest())


async def send(call: grpc.aio.StreamStreamCall, message: Any) -> None:
    """Writes to a stream whose peer may already have ended it (a replica that died): the status then comes
    from reading the call, as an AioRpcError with the real code, not as asyncio's InvalidStateError here."""
    with contextlib.suppress(asyncio.InvalidStateError):
        await call.write(message)


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


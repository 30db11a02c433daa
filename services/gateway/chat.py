"""One chat request through the mesh: authenticate, resolve, template, reserve, generate, detokenize, stop strings,
settle (services/gateway/accounting.py).

Answers are detokenized in the gateway from the cached vocabulary where that gives the tokenizer's text
(services/gateway/detokenize.py: byte-level vocabularies, checked once per version), so a decode step costs one
message in and one out. Otherwise the token path is pipelined: one task forwards token ids from inference to the
tokenizer's DetokenizeStream while the caller reads text deltas from it, so no hop waits on another per token.
Per-token logprobs ride along: chunk i's entries are matched with the detokenizer's response i.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from lmesh.common.v1 import generation_pb2
from lmesh.embeddings.v1 import embeddings_pb2
from lmesh.inference.v1 import inference_pb2
from lmesh.inference.v1.inference_pb2_grpc import InferenceStub
from lmesh.policy.v1 import policy_pb2
from lmesh.registry.v1 import registry_pb2
from lmesh.tokenizer.v1 import tokenizer_pb2
from lmesh.tokenizer.v1.tokenizer_pb2_grpc import TokenizerStub
from opentelemetry import trace

from services.common.access import version_allowed
from services.common.discovery import Endpoint, Mesh, meta_models
from services.common.errors import InvalidArgument, PermissionDenied, Reason, Unavailable
from services.common.peers import (
    EMBEDDINGS,
    INFERENCE,
    POLICY,
    REGISTRY,
    TOKENIZER,
    Lease,
    Peer,
    refused_hop,
    send,
    write_first,
)
from services.common.references import check_reference
from services.common.rpc import error_reason, mark_failed
from services.gateway import metrics
from services.gateway.accounting import REFUSED_CODES, Accounts, Meter, OverlappedAdmission, status_code
from services.gateway.admission import (
    DEFAULT_MAX_CHATS,
    DEFAULT_STALLED_CLIENT_S,
    MAX_BUFFERED_BYTES,
    ChatAdmission,
)
from services.gateway.affinity import SessionAffinity, SessionPlacement, session_key
from services.gateway.credentials import (
    DEFAULT_PRINCIPAL_TTL_S,
    Credential,
    RecentPrincipals,
    credential_digest,
    credential_fields,
)
from services.gateway.detokenize import ByteDetokenizer, LocalDetokenizing
from services.gateway.logprobs import MAX_TOP_LOGPROBS, AnswerAssembler, TokenLogprob, Vocabulary, VocabularyCache
from services.gateway.models import ModelDirectory
from services.gateway.render import LocalRendering, rendered_locally
from services.inference.sampling import validate_penalties, validated_logit_bias

if TYPE_CHECKING:
    from services.gateway.functions import FunctionCall, FunctionCalling
    from services.gateway.mesh_tools import ToolRequest
    from services.gateway.response_cache import ResponseCache
    from services.gateway.screen import Screening

ROLES = ("system", "user", "assistant")
# GenerateStart's fields that a replica may refuse, as ChatStart names them.
REPLICA_FIELDS = (("sampling.", ""), ("constraint.", "response_format."))
MAX_STOPS = 4
MAX_STOP_CHARS = 64
DEFAULT_MODEL = "default"
MIN_PRIORITY, MAX_PRIORITY = 0, 9  # GenerateStart.priority's range: higher is served first

# How long a chat waits for a version a replica is loading (a model's first rollout, a swap with a drain).
LOAD_WAIT_S = 60.0
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
    session: str = ""  # the caller's session (OpenAI's `user`): its turns go to one replica (affinity.py)
    priority: int | None = None  # 0-9, capped by the key's max_priority; None: the key's max_priority
    cache_read: bool = True  # may be answered from the response cache (response_cache.py)
    cache_store: bool = True  # may have its answer stored there
    tools: ToolRequest | None = None  # mesh tools the gateway may call first (mesh_tools.py)
    response_format: generation_pb2.OutputConstraint | None = None  # what the answer must match
    functions: FunctionCalling | None = None  # the client's functions the model may call (functions.py)
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), by id


@dataclass
class ChatDelta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ChatEnd:
    finish_reason: generation_pb2.FinishReason.ValueType
    usage: generation_pb2.Usage  # inference's, every field set (its prompt is the rendered one)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    function_calls: list[FunctionCall] = field(default_factory=list)  # with FINISH_REASON_TOOL_CALLS


@dataclass(frozen=True)
class Prepared:
    """A chat ready to generate: the version, the rendered prompt, the max_tokens that fit the context, the
    tokenizer instance that rendered it (None: the gateway did), and policy's reservation for it (settle it:
    `Accounts.held`)."""

    version: registry_pb2.ModelVersion
    prompt: list[int]
    max_tokens: int
    tokenizer: Endpoint | None  # the instance that rendered the prompt; None: rendered here (render.py)
    admission: asyncio.Future[policy_pb2.ReserveResponse]  # policy's reservation; deciding still if `overlapped`
    priority: int = MIN_PRIORITY  # what the engine's queue orders it by: the request's, capped by its key's
    placement: SessionPlacement | None = None  # its session, when it names one
    tenant: str = ""  # whom policy authenticated: the response cache's answers are never shared across tenants
    requested_priority: int | None = None  # what the request asked for (the key's cap may change it)

    def confirmed_priority(self, reservation: policy_pb2.ReserveResponse) -> int:
        """The priority the principal that the admission authenticated allows this chat (an overlapped chat was
        prepared with a remembered one). Its tenant must be the one the chat was prepared for (the response cache
        was asked for that tenant's answers): a credential that moved to another tenant meanwhile is refused."""
        if not reservation.HasField("principal"):
            return self.priority
        principal = reservation.principal
        if principal.tenant != self.tenant:
            raise Unavailable("the credential was moved to another tenant while this request was admitted; "
                              "send it again", retry_after_s=0.0)
        return capped_priority(self.requested_priority, principal)


@dataclass(frozen=True)
class Completed:
    """A whole generation (ChatService.complete): its text (stop strings applied), usage, model version and
    policy's admission of it."""

    text: str
    usage: generation_pb2.Usage
    model: str  # `name:version`
    admitted: policy_pb2.ReserveResponse


def capped_priority(requested: int | None, principal: policy_pb2.Principal) -> int:
    """The priority a chat runs at: the one it asked for, clipped to its key's max_priority (a chat may not take
    more than the operator granted, and asking too much is not an error); none asked, the key's max_priority."""
    return principal.max_priority if requested is None else min(requested, principal.max_priority)


# A tokenizer's normalizer may shrink text before it is encoded, at most 3 UTF-8 bytes to 1 (NFKC: a fullwidth
# letter); the size bound below allows for more.
NORMALIZED_SHRINK_BOUND = 4


def refuse_what_cannot_fit(messages: Sequence[tuple[str, str]], vocabulary: Vocabulary, max_prompt_tokens: int,
                           ) -> None:
    """InvalidArgument (`messages`) when the messages' size alone shows that their prompt has more than
    `max_prompt_tokens` tokens: a token of a byte-level vocabulary stands for at most its longest entry's bytes.
    The tokenizer refuses such a prompt the same way, but only after guardrails have read every byte of it."""
    size = sum(len(content.encode("utf-8", "surrogatepass")) for _, content in messages)
    least = size // (vocabulary.longest_token_bytes * NORMALIZED_SHRINK_BOUND)
    if least > max_prompt_tokens:
        raise InvalidArgument("messages", f"the prompt is at least {least} tokens; at most {max_prompt_tokens} fit "
                                          "the model's context")


MAX_CONSTRAINT_BYTES = 64 * 1024


def check_constraint(constraint: generation_pb2.OutputConstraint, field: str) -> None:
    """The form of an output constraint (the engine compiles it and refuses what it cannot)."""
    kind = constraint.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(field, "set one of json_schema, lark_grammar or regex")
    text = getattr(constraint, kind)
    if not text.strip():
        raise InvalidArgument(f"{field}.{kind}", "must not be empty")
    if len(text.encode()) > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(f"{field}.{kind}", f"at most {MAX_CONSTRAINT_BYTES} bytes")


def validate(params: ChatParams) -> ChatParams:
    check_reference(params.model, "model")
    if not params.messages:
        raise InvalidArgument("messages", "must not be empty")
    for index, (role, _) in enumerate(params.messages):
        if role not in ROLES:
            raise InvalidArgument(f"messages[{index}].role",
                                  f"must be one of {', '.join(ROLES)} or tool, got '{role}'")
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
    validate_penalties(params.presence_penalty, params.frequency_penalty)
    validated_logit_bias(dict(params.logit_bias), None)  # the ids' upper bound is the replica's to check
    if len(params.stop) > MAX_STOPS:
        raise InvalidArgument("stop", f"at most {MAX_STOPS} stop strings, got {len(params.stop)}")
    for index, stop in enumerate(params.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"stop[{index}]", f"must be 1 to {MAX_STOP_CHARS} characters")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")
    if params.top_logprobs and not params.logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs set to true")
    if params.priority is not None and not MIN_PRIORITY <= params.priority <= MAX_PRIORITY:
        raise InvalidArgument("priority", f"must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {params.priority}")
    if params.tools is not None:
        params.tools.validate()
    if params.response_format is not None:
        check_constraint(params.response_format, "response_format")
        if (params.functions is not None and params.functions.active
                and params.response_format.WhichOneof("kind") != "json_schema"):
            raise InvalidArgument("response_format", "with functions to call, only a JSON Schema is supported")
    return params


def allowed(principal: policy_pb2.Principal, version: registry_pb2.ModelVersion) -> bool:
    """The policy service's rule (services.common.access), so ListModels shows what Authorize allows."""
    return version_allowed(principal.allowed_models, f"{version.name}:{version.version}", version.aliases)


def not_allowed(principal: policy_pb2.Principal, model: str, model_id: str) -> PermissionDenied:
    """What policy answers for a model the key may not use (the gateway checks first, so it renders no prompt for
    it)."""
    behind = "" if model == model_id else f" ({model_id})"
    return PermissionDenied(f"key {principal.key_id} may not use model '{model}'{behind}",
                            reason=Reason.MODEL_NOT_ALLOWED, metadata={"model": model})


class ChatService:
    """The gateway's domain: every upstream call of a chat, and the flow between them."""

    def __init__(self, mesh: Mesh, tracer: trace.Tracer, response_cache: ResponseCache | None = None, *,
                 max_chats: int = DEFAULT_MAX_CHATS, stalled_client_s: float | None = DEFAULT_STALLED_CLIENT_S,
                 principal_ttl_s: float = DEFAULT_PRINCIPAL_TTL_S, overlap_admission: bool = True,
                 render_artifacts: Path | None = None) -> None:
        """`render_artifacts`: where the gateway keeps the tokenizer artifacts it renders prompts with (render.py);
        None: lmesh-tokenizer renders every prompt."""
        self.principals = RecentPrincipals(principal_ttl_s)  # spares a chat's first call; Reserve decides
        self.overlapping = OverlappedAdmission(overlap_admission)  # Reserve while the engine starts the prompt
        self.admission = ChatAdmission(max_chats)  # the bound on chats in flight (request_path.chat_events)
        self.stalled_client_s = stalled_client_s  # a client that reads nothing this long is cut (None: never)
        self.stream_buffer_bytes = MAX_BUFFERED_BYTES  # what one stream's buffer holds for a lagging client
        self._policy = mesh.peer(POLICY)
        self._tokenizer = mesh.peer(TOKENIZER)
        self._inference = mesh.peer(INFERENCE)
        self.models = ModelDirectory(mesh.peer(REGISTRY))
        self.vocabularies = VocabularyCache(self._tokenizer)
        self.local_detokenizing = LocalDetokenizing(self.vocabularies, self._tokenizer)
        self.local_rendering = LocalRendering(mesh.peer(REGISTRY), self._tokenizer, render_artifacts)
        self.accounts = Accounts(self._policy)
        self.affinity = SessionAffinity()
        self._tracer = tracer
        from services.gateway.screen import Guardrails  # it builds on this module's types

        self.guardrails = Guardrails(self._policy, self.vocabularies)
        from services.gateway.response_cache import ResponseCache  # it builds on this module's types

        self.response_cache = response_cache if response_cache is not None else ResponseCache.off()
        from services.gateway.mesh_tools import MeshTools  # it builds on this module's types
        from services.gateway.tool_catalog import ToolCatalog
        from services.gateway.tool_retrieval import ToolIndex, embeddings_of

        self._embeddings = mesh.peer(EMBEDDINGS)
        self.mesh_tools = MeshTools(ToolCatalog(mesh), ToolIndex(embeddings_of(self._embeddings)), tracer)

    async def close(self) -> None:
        """At the gateway's stop: the settles of the last chats go out, and the rules' stream ends."""
        await self.accounts.drain()
        await self.guardrails.close()
        await self.response_cache.close()
        await self.mesh_tools.catalog.close()
        await self.models.close()

    async def authenticate(self, credential: Credential | str) -> policy_pb2.Principal:
        """The principal of an API key (a string) or of a verified client certificate."""
        response = await self._policy.call(lambda p: p.Authenticate,
                                           policy_pb2.AuthenticateRequest(**credential_fields(credential)), timeout=10)
        return response.principal

    async def embed(self, credential: Credential | str, request: embeddings_pb2.EmbedRequest,
                    ) -> embeddings_pb2.EmbedResponse:
        """lmesh-embeddings' answer for any valid key (its own errors are relayed as they came)."""
        await self.authenticate(credential)
        return await self._embeddings.call(lambda stub: stub.Embed, request, timeout=30)

    async def list_models(self, credential: Credential | str) -> list[registry_pb2.ModelVersion]:
        principal = await self.authenticate(credential)
        return [m for m in await self.models.list() if allowed(principal, m)]

    async def served_models(self) -> set[str]:
        """The `name:version`s that at least one passing inference replica serves now (Consul meta `models`)."""
        return {model for endpoint in await self._inference.passing() for model in endpoint.models}

    async def _wait_while_loading(self, model_id: str) -> None:
        """A version no replica serves yet but one is loading (a first rollout, or a swap with a drain): the request
        waits for it, up to LOAD_WAIT_S, rather than fail; otherwise the replica choice refuses it, naming it."""
        await self._inference.passing()  # the watch's first answer
        # A replica that failed a check while it loads (a load can hold the GIL) is still loading the version.
        if not any(model_id in meta_models(e.meta, "loading") for e in self._inference.recently_passing()):
            return
        with contextlib.suppress(TimeoutError):
            await self._inference.wait_for(lambda e: model_id in e.models, timeout=LOAD_WAIT_S)

    async def prepare(self, credential: Credential | str, params: ChatParams, request_id: str = "",
                      screening: Screening | None = None, *, overlap: bool = False, continues: str = "",
                      ) -> Prepared:
        """Authenticates the credential (an API key, or a verified client certificate), resolves the model, screens
        the input (guardrails), renders the prompt, then has policy admit the request and reserve its exact prompt
        plus max_tokens under the id `request_id` (the completion id). The caller settles the reservation
        (`Accounts.held`). `overlap`: return without waiting for the admission where `OverlappedAdmission` allows
        it; the caller then starts generating while it decides and releases nothing before it admits
        (request_path.started_while_admitting). `continues`: the reservation of the admitted request this one is
        part of (a tool chat's plan, for its answer): policy counts no second request."""
        with self._tracer.start_as_current_span("authorize", record_exception=False,
                                                 set_status_on_exception=False) as span:
            try:
                # First, and cheap: without a valid key nothing else runs (no model probing, no rendering).
                principal = self.principals.get(credential)
                if principal is None:
                    principal = await self.authenticate(credential)
                    self.principals.remember(credential, principal)
                metrics.note_tenant(principal.tenant)
                served = await self.served_models()
                session = session_key(principal.tenant, params.session) if params.session else ""
                version = await self.models.route(params.model, served, session)  # cached: usually no call
                model_id = f"{version.name}:{version.version}"
                if model_id not in served:
                    await self._wait_while_loading(model_id)
                metrics.note_model(params.model, model_id)
                if not allowed(principal, version):
                    raise not_allowed(principal, params.model, model_id)
            except Exception as exc:
                mark_failed(span, exc)
                raise
        if len(params.messages) > version.context_length:
            # Every turn renders to at least one token: this many cannot fit, and rendering them (seconds for
            # hundreds of thousands of empty turns) would only find that out.
            raise InvalidArgument("messages", f"{len(params.messages)} messages cannot fit the model's context of "
                                              f"{version.context_length} tokens")
        vocabulary = self.local_detokenizing.vocabulary(model_id)  # a verified byte-level one, once checked
        if vocabulary is not None:  # megabytes that cannot fit are refused before guardrails read them
            refuse_what_cannot_fit(params.messages, vocabulary, version.context_length - 1)
        if screening is not None:  # guardrails on the messages, before the prompt is rendered
            params = await self.guardrails.screen_input(screening, principal, version, params)
        context = version.context_length
        # At least one token of the context is left for the answer. A prompt that cannot fit is refused by the
        # tokenizer, before encoding it when its size alone shows that.
        prompt, tokenizer = await self._render(version, params.messages, context - 1)
        if len(prompt) >= context:  # a tokenizer that predates max_prompt_tokens
            raise InvalidArgument("messages", f"the prompt is {len(prompt)} tokens; the model's context is {context}")
        max_tokens = min(params.max_tokens, context - len(prompt))
        reserve = policy_pb2.ReserveRequest(
            **credential_fields(credential), model=params.model, resolved_model=model_id,
            resolved_aliases=list(version.aliases), prompt_tokens=len(prompt), max_tokens=max_tokens,
            reservation_id=request_id or new_completion_id(), continues=continues)
        digest = credential_digest(credential)
        overlapped = overlap and self.overlapping.begin(digest)
        admission = asyncio.ensure_future(self._reserve(reserve, credential, digest, overlapped))
        if not overlapped:
            # Reserve authenticated the credential again: its principal is the one that decides (the one above may
            # be a remembered one, RecentPrincipals). An overlapped chat checks that when the admission answers.
            reservation = await admission
            if reservation.HasField("principal"):
                principal = reservation.principal
        priority = capped_priority(params.priority, principal)
        placement = (SessionPlacement(self.affinity, session_key(principal.tenant, params.session))
                     if params.session else None)
        request_span = trace.get_current_span()
        request_span.set_attribute("lmesh.priority", priority)
        if params.priority is not None:  # what was asked, and whether the key's cap clipped it
            request_span.set_attributes({"lmesh.request.priority": params.priority,
                                         "lmesh.priority.clipped": priority < params.priority})
        if placement is not None:
            request_span.set_attribute("lmesh.session.hash", placement.session)  # never the name: user data
        return Prepared(version, prompt, max_tokens, tokenizer, admission, priority, placement, principal.tenant,
                        params.priority)

    async def _render(self, version: registry_pb2.ModelVersion, messages: list[tuple[str, str]],
                      max_prompt_tokens: int) -> tuple[list[int], Endpoint | None]:
        """The prompt's ids, and the tokenizer instance that rendered them (None: rendered here, render.py)."""
        local = self.local_rendering.tokenizer(version, messages)
        trace.get_current_span().set_attribute("lmesh.prompt.rendered_by", "tokenizer" if local is None else "gateway")
        if local is not None:
            return rendered_locally(local, messages, max_prompt_tokens), None
        request = tokenizer_pb2.ApplyChatTemplateRequest(
            model=f"{version.name}:{version.version}", add_generation_prompt=True, max_prompt_tokens=max_prompt_tokens,
            messages=[tokenizer_pb2.ChatMessage(role=r, content=c) for r, c in messages])

        async def render(lease: Lease[TokenizerStub]) -> tuple[tokenizer_pb2.ApplyChatTemplateResponse, Endpoint]:
            return await lease.stub.ApplyChatTemplate(request, **lease.options(timeout=10)), lease.endpoint

        rendered, tokenizer = await self._tokenizer.with_lease(render)
        return list(rendered.token_ids), tokenizer

    async def _reserve(self, request: policy_pb2.ReserveRequest, credential: Credential | str, digest: bytes,
                       overlapped: bool) -> policy_pb2.ReserveResponse:
        """Policy's admission of the request (Accounts.reserve), its outcome kept for OverlappedAdmission."""
        with self._tracer.start_as_current_span("reserve", record_exception=False,
                                                 set_status_on_exception=False) as span:
            span.set_attribute("lmesh.admission.overlapped", overlapped)
            try:
                reservation = await self.accounts.reserve(request)
            except Exception as exc:
                mark_failed(span, exc)
                self.overlapping.refused(digest)  # refused, or policy out of reach: the next chats wait for it
                if status_code(exc) in REFUSED_CODES:
                    self.principals.forget(credential)
                raise
            finally:
                self.overlapping.ended(digest, overlapped)
        self.overlapping.admitted(digest)
        return reservation

    async def complete(self, credential: Credential | str, params: ChatParams, request_id: str,
                       screening: Screening | None = None,
                       enough: Callable[[str], str | None] = lambda text: None,
                       ) -> Completed:
        """A whole generation that no client sees as it streams (a tool plan): authorized, reserved and settled
        as any chat. `enough` sees the text as it grows and may end the generation early: what it returns is
        then the text."""
        prepared = await self.prepare(credential, params, request_id, screening)
        model_id = f"{prepared.version.name}:{prepared.version.version}"
        pieces: list[str] = []
        cancel = asyncio.Event()
        cut: str | None = None
        async with self.accounts.held(prepared.admission) as meter:
            async for event in self.generate(prepared.version, prepared.prompt, prepared.max_tokens, params,
                                             cancel, request_id, prepared.tokenizer, meter,
                                             priority=prepared.priority, placement=prepared.placement):
                if isinstance(event, ChatDelta):
                    pieces.append(event.text)
                    if cut is None and (cut := enough("".join(pieces))) is not None:
                        cancel.set()
                else:
                    return Completed(cut if cut is not None else "".join(pieces), event.usage, model_id,
                                     prepared.admission.result())
        raise Unavailable("the generation ended without a finish")

    async def generate(self, version: registry_pb2.ModelVersion, prompt: list[int], max_tokens: int,
                       params: ChatParams, cancel: asyncio.Event, request_id: str = "",
                       tokenizer: Endpoint | None = None, meter: Meter | None = None, *,
                       priority: int = MIN_PRIORITY, placement: SessionPlacement | None = None,
                       ) -> AsyncIterator[ChatDelta | ChatEnd]:
        """Streams the answer: text deltas of inference's tokens, detokenized here (`LocalDetokenizing`) or by the
        tokenizer's DetokenizeStream, with stop strings applied and logprobs aligned.

        `tokenizer`: the instance that rendered the prompt, which detokenizes it too: it holds the model's
        tokenizer, where another passing one may not (started while the registry was down). `meter` counts what
        was used, however the generation ends (what the reservation is settled with). `priority` orders it in the
        replica's queue; `placement` chooses the replica of its session (services/gateway/affinity.py)."""
        meter = meter if meter is not None else Meter()
        model_id = f"{version.name}:{version.version}"
        # Fetched once per model version; later requests find it cached.
        answer = AnswerAssembler(params.stop, await self.vocabularies.get(model_id) if params.logprobs else None)
        inference = InferenceStream(self._inference, model_id, _generate_start(model_id, prompt, max_tokens, params,
                                                                               request_id, priority), placement)
        finish: list[inference_pb2.GenerateFinish] = []
        tokens = _TokenFlow(answer, finish, meter, len(prompt))
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(inference)
            watcher = asyncio.create_task(_cancel_when_set(cancel, inference))
            stack.callback(watcher.cancel)
            vocabulary = self.local_detokenizing.vocabulary(model_id)
            if vocabulary is not None:
                pieces = await stack.enter_async_context(contextlib.aclosing(
                    _detokenized_here(inference, ByteDetokenizer(vocabulary), tokens)))
            else:
                pieces = await stack.enter_async_context(self._detokenized_by_tokenizer(model_id, tokenizer,
                                                                                        inference, tokens))
            async for delta, final in pieces:
                text, entries = answer.piece(delta, final)
                if text:
                    yield ChatDelta(text, entries)
                if answer.stopped:
                    await inference.cancel()
        if not finish:
            raise Unavailable("the inference stream ended without a finish message")
        if not finish[0].HasField("usage"):
            # Its tokens, too, came in a field this gateway no longer reads (inference.proto's reserved numbers).
            raise Unavailable(f"inference replica {inference.replica.target} sent no usage: it runs an lmesh older "
                              "than this gateway's lmesh.common.v1 types; upgrade it")
        reason = generation_pb2.FINISH_REASON_STOP if answer.stopped else finish[0].reason
        meter.finished(finish[0].usage, cancelled=reason == generation_pb2.FINISH_REASON_CANCELLED)
        yield ChatEnd(reason, finish[0].usage, answer.rest())

    @contextlib.asynccontextmanager
    async def _detokenized_by_tokenizer(self, model_id: str, rendered_by: Endpoint | None,
                                        inference: InferenceStream, tokens: _TokenFlow,
                                        ) -> AsyncIterator[AsyncGenerator[tuple[str, bool], None]]:
        """The answer's (delta, final) pieces from a DetokenizeStream that a pump task feeds from inference."""
        async with self._detokenizer(model_id, rendered_by) as detokenizer:
            pump = asyncio.create_task(_pump(inference, detokenizer.call, tokens))
            # A failed pump (inference died) cuts the detokenizer's stream so the read below ends at once.
            pump.add_done_callback(lambda t: detokenizer.call.cancel() if not t.cancelled() and t.exception() else None)
            try:
                async with contextlib.aclosing(detokenizer.pieces(pump)) as pieces:
                    yield pieces
            finally:
                pump.cancel()

    @contextlib.asynccontextmanager
    async def _detokenizer(self, model_id: str, rendered_by: Endpoint | None) -> AsyncIterator[DetokenizerStream]:
        """A DetokenizeStream on the instance that rendered the prompt if it still passes, else on any."""
        same = rendered_by is not None and any(e.service_id == rendered_by.service_id
                                               for e in self._tokenizer.endpoints())
        predicate = (lambda e: e.service_id == rendered_by.service_id) if same and rendered_by else None
        async with self._tokenizer.lease(predicate) as lease:
            call = lease.stub.DetokenizeStream(**lease.options())
            try:
                call = await write_first(call, tokenizer_pb2.DetokenizeStreamRequest(
                    start=tokenizer_pb2.DetokenizeStart(model=model_id, skip_special_tokens=True)),
                    lambda: lease.stub.DetokenizeStream(**lease.options()))
                yield DetokenizerStream(self._tokenizer, lease, call)
            finally:
                call.cancel()


def _generate_start(model_id: str, prompt: list[int], max_tokens: int, params: ChatParams,
                    request_id: str, priority: int = MIN_PRIORITY) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
        model=model_id, prompt_token_ids=prompt, max_tokens=max_tokens,
        sampling=inference_pb2.SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, logit_bias=dict(params.logit_bias)),
        top_logprobs=params.top_logprobs, request_id=request_id, priority=priority,
        constraint=params.response_format))


@dataclass
class _TokenFlow:
    """What every inference response updates, wherever its ids are detokenized: the meter, the logprobs'
    chunks, the finish."""

    answer: AnswerAssembler
    finish: list[inference_pb2.GenerateFinish]
    meter: Meter
    prompt_tokens: int

    def ids(self, response: inference_pb2.GenerateResponse) -> list[int] | None:
        """The token ids of `response` (None for the finish, which is kept)."""
        if not self.meter.prompt_tokens:
            self.meter.started(self.prompt_tokens)  # a replica took the request: its prompt is processed
        if response.HasField("tokens"):
            tokens = response.tokens.tokens
            self.meter.received(len(tokens))
            self.answer.add_chunk(tokens)  # first: the detokenizer may answer at once
            return [t.token_id for t in tokens]
        if response.HasField("finish"):
            self.finish.append(response.finish)
        return None


async def _detokenized_here(inference: InferenceStream, detokenizer: ByteDetokenizer, tokens: _TokenFlow,
                            ) -> AsyncGenerator[tuple[str, bool], None]:
    """(delta, final) per decode step of inference, detokenized in this task: one piece per chunk, as the
    tokenizer's stream answers, then the final one."""
    async for response in inference.responses():
        if (ids := tokens.ids(response)) is not None:
            yield detokenizer.push(ids), False
    yield detokenizer.flush(), True


async def _pump(inference: InferenceStream, detokenize_call: grpc.aio.StreamStreamCall, tokens: _TokenFlow) -> None:
    """inference → tokenizer, one message per decode step, as they arrive."""
    async for response in inference.responses():
        if (ids := tokens.ids(response)) is not None:
            await send(detokenize_call, tokenizer_pb2.DetokenizeStreamRequest(
                tokens=tokenizer_pb2.TokenIds(token_ids=ids)))
    await detokenize_call.done_writing()


async def _cancel_when_set(cancel: asyncio.Event, inference: InferenceStream) -> None:
    await cancel.wait()
    await inference.cancel()


class InferenceStream:
    """One generation on a replica serving its model version. A replica that refuses the request before its
    first token (queue full, draining, or dead before Consul noticed) is left for another one serving the same
    version; a cancel goes out once, after the start (grpc allows one write at a time). With a `placement`, a
    request of a session goes to its session's replica when the placement prefers one."""

    def __init__(self, peer: Peer[InferenceStub], model_id: str, start: inference_pb2.GenerateRequest,
                 placement: SessionPlacement | None = None) -> None:
        self._peer = peer
        self._placement = placement
        self._model_id = model_id
        self._start = start
        self._refused: set[str] = set()
        self._held = contextlib.AsyncExitStack()  # the lease on the current replica
        self._lease: Lease[InferenceStub] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._start_written = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._cancelled = False

    def _serves(self, endpoint: Endpoint) -> bool:
        # A replica draining the version after a rollout still takes it for a grace period (Consul meta `draining`):
        # a chat routed to it just before the switch is not refused for want of a replica.
        serving = self._model_id in endpoint.models or self._model_id in meta_models(endpoint.meta, "draining")
        return serving and endpoint.service_id not in self._refused

    async def __aenter__(self) -> InferenceStream:
        await self._open(none_match=f"no inference replica serves {self._model_id}; start one with "
                                    f"`lmesh serve inference --model {self._model_id}`")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._call is not None:
            self._call.cancel()
        await self._held.aclose()

    async def _open(self, none_match: str = "") -> None:
        """Opens the call on a replica that serves the version and has not refused it (its session's, if preferred)."""
        predicate: Callable[[Endpoint], bool] = self._serves
        if self._placement is not None:
            wanted = self._placement.choose([e for e in await self._peer.passing() if self._serves(e)])
            if wanted is not None:
                predicate = lambda e: self._serves(e) and e.service_id == wanted  # noqa: E731
        held = contextlib.AsyncExitStack()
        lease = await held.enter_async_context(self._peer.lease(predicate, none_match=none_match))
        await self._held.aclose()  # the replica that refused it no longer counts this call
        self._held, self._lease = held, lease
        self._call = self._generate()

    def _generate(self) -> grpc.aio.StreamStreamCall:
        assert self._lease is not None
        return self._lease.stub.Generate(**self._lease.options())

    @property
    def replica(self) -> Endpoint:
        assert self._lease is not None
        return self._lease.endpoint

    async def responses(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        admitted = False
        while True:
            assert self._call is not None
            try:
                async with self._write_lock:
                    self._call = await write_first(self._call, self._start, self._generate)
                self._start_written.set()
                async for response in self._call:
                    if not admitted:
                        admitted = True
                        self._admitted()
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                if (refused := refused_hop(exc, self._peer.name)) is not None:
                    raise refused from None
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._peer.mark_down(self.replica)
                # A replica that no longer serves the version (it moved on after a rollout) refuses it unstarted too.
                moved_on = code == grpc.StatusCode.NOT_FOUND and error_reason(exc) == Reason.MODEL_NOT_SERVED
                if not admitted and (code in RETRY_ELSEWHERE or moved_on) and not self._cancelled:
                    self._refused.add(self.replica.service_id)
                    self._call.cancel()
                    with contextlib.suppress(Unavailable):  # none left: the refusal itself is the answer
                        await self._open()
                        continue
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise Unavailable(f"inference replica {self.replica.target} became unavailable: "
                                      f"{exc.details()}") from exc
                details = exc.details() or ""
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    # What only the replica can check (logit_bias's ids against its vocabulary, whether a constraint
                    # compiles), under the name the caller sent: ChatStart's sampling fields are SamplingParams'
                    # own, and its `response_format` is GenerateStart's `constraint`.
                    for replica_prefix, caller_prefix in REPLICA_FIELDS:
                        if details.startswith(replica_prefix):
                            field, _, problem = details.partition(": ")
                            raise InvalidArgument(caller_prefix + field.removeprefix(replica_prefix), problem) from None
                raise

    def _admitted(self) -> None:
        """The replica took the request: its session's next turns go there."""
        trace.get_current_span().set_attribute("lmesh.inference.replica", self.replica.service_id)
        if self._placement is not None:
            self._placement.served(self.replica)

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        await self._start_written.wait()
        async with self._write_lock:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                assert self._call is not None
                await send(self._call, inference_pb2.GenerateRequest(cancel=inference_pb2.CancelGeneration()))


class DetokenizerStream:
    """The tokenizer's DetokenizeStream of one answer: ids in (the pump), text deltas out."""

    def __init__(self, peer: Peer[TokenizerStub], lease: Lease[TokenizerStub], call: grpc.aio.StreamStreamCall
                 ) -> None:
        self._peer = peer
        self._lease = lease
        self.call = call

    async def pieces(self, pump: asyncio.Task[None]) -> AsyncGenerator[tuple[str, bool], None]:
        """The detokenizer's (delta, final) responses, until the pump ended too; a failure of the pump
        (inference's) wins over the cut it causes here."""
        try:
            async for piece in self.call:
                yield piece.delta, piece.final
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            failure = pump.exception() if pump.done() and not pump.cancelled() else None
            if failure is not None:
                raise failure from None
            if isinstance(exc, grpc.aio.AioRpcError) and (refused := refused_hop(exc, self._peer.name)) is not None:
                raise refused from None
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._peer.mark_down(self._lease.endpoint)
                raise Unavailable(f"tokenizer {self._lease.endpoint.target} became unavailable: "
                                  f"{exc.details()}") from exc
            raise
        await pump  # re-raises an inference failure (UNAVAILABLE when the replica died)


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"

"""The OpenAI-compatible HTTP API without the mesh: the real ASGI app, uvicorn and request path (chat_events,
validate) in front of a fake ChatService, driven by the official `openai` SDK, raw HTTP, Hypothesis and
schemathesis (against the /openapi.json the app serves). tests/test_openai_e2e.py runs the same API against a
live mesh with the real model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import openai
import pytest
import pytest_asyncio
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmesh.common.v1 import generation_pb2
from lmesh.embeddings.v1 import embeddings_pb2
from lmesh.policy.v1 import policy_pb2
from lmesh.registry.v1 import registry_pb2
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import ConfigError, ServiceConfig
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.gateway.accounting import Accounts, Meter, decided, openai_duration
from services.gateway.admission import DEFAULT_MAX_CHATS, MAX_BUFFERED_BYTES, ChatAdmission
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams, Prepared
from services.gateway.credentials import Credential
from services.gateway.http_server import HttpDoor, OpenAIApp
from services.gateway.logprobs import Candidate, TokenLogprob
from services.gateway.main import GatewaySettings
from services.gateway.mesh_tools import MeshTools
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import CHAT_REQUEST, COMPLETION_REQUEST
from services.gateway.response_cache import ResponseCache

KEY = "lmk_good"
ANSWER = ["Paris", " is", " the", " capital", " of", " France", "."]
VERSION = registry_pb2.ModelVersion(name="tiny", version="1", aliases=["default"], context_length=64,
                                    create_time_unix_ms=1_700_000_000_000)
HIDDEN = registry_pb2.ModelVersion(name="secret", version="1", context_length=64)
MISBEHAVING = ("busy", "down", "slow", "bug", "late", "endless")
USER = [{"role": "user", "content": "What is the capital of France?"}]


class FakeModels:
    def __init__(self, accept_any: bool) -> None:
        self.accept_any = accept_any

    async def resolve(self, reference: str) -> registry_pb2.ModelVersion:
        if reference == "secret":
            return HIDDEN
        if reference in ("default", "tiny", "tiny:1", *MISBEHAVING) or (self.accept_any and reference != "nope"):
            return VERSION
        raise NotFound(f"model {reference!r} not found", reason=Reason.MODEL_NOT_FOUND, metadata={"model": reference})


class PassThrough:
    async def screen_output(self, screening: object, events: AsyncIterator[ChatDelta | ChatEnd], cancel: object,
                            logprobs: bool = False) -> AsyncIterator[ChatDelta | ChatEnd]:
        async for event in events:
            yield event


class FakeAccounts(Accounts):
    """Accounts whose settles are recorded instead of sent to policy: reservation id -> how the chat ended."""

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.settled: dict[str, Meter] = {}

    def settle_later(self, reservation_id: str, meter: Meter, *, maybe: bool = False) -> None:
        self.settled[reservation_id] = meter


class NoTools:
    """A mesh without tool services."""

    async def tools(self) -> dict[str, object]:
        return {}


@dataclass
class FakeChat:
    """ChatService's surface, with models that misbehave on purpose: `busy` (queue full), `down`, `slow`
    (a dependency timeout), `bug`, `late` (fails after the first delta), `endless` (never ends by itself)."""

    accept_any: bool = False
    context: int = VERSION.context_length
    seen: list[ChatParams] = field(default_factory=list)
    generating: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    max_chats: int = DEFAULT_MAX_CHATS
    stalled_client_s: float | None = None
    stream_buffer_bytes: int = MAX_BUFFERED_BYTES
    generations: int = 0  # calls of generate: what ran "the model"
    response_cache: ResponseCache = field(default_factory=ResponseCache.off)
    # What policy's admission says of the key's rate limits (none: the key has none).
    key_limits: policy_pb2.Limits | None = None
    key_window: policy_pb2.RateWindow | None = None

    def __post_init__(self) -> None:
        self.admission = ChatAdmission(self.max_chats)
        self.models = FakeModels(self.accept_any)
        self.guardrails = PassThrough()
        self.accounts = FakeAccounts()
        self.mesh_tools = MeshTools(NoTools(), None, trace.get_tracer("test"))  # type: ignore[arg-type]

    async def authenticate(self, credential: Credential | str) -> policy_pb2.Principal:
        key = credential.api_key if isinstance(credential, Credential) else credential
        if key != KEY:
            raise Unauthenticated("invalid API key")
        return policy_pb2.Principal(key_id="key_1", tenant="acme", allowed_models=["tiny", "default"])

    async def list_models(self, credential: Credential) -> list[registry_pb2.ModelVersion]:
        await self.authenticate(credential)
        return [VERSION]

    async def embed(self, credential: Credential, request: embeddings_pb2.EmbedRequest,
                    ) -> embeddings_pb2.EmbedResponse:
        await self.authenticate(credential)
        if request.model not in ("", "mini"):
            raise NotFound(f"model {request.model!r} is not served here")
        return embeddings_pb2.EmbedResponse(
            embeddings=[embeddings_pb2.Embedding(index=i, values=[0.6, 0.8 if len(text) % 2 else -0.8],
                                                 token_count=len(text.split()) + 2)
                        for i, text in enumerate(request.inputs)],
            model="mini", dimensions=2, usage=embeddings_pb2.EmbedUsage(
                prompt_tokens=sum(len(t.split()) + 2 for t in request.inputs),
                total_tokens=sum(len(t.split()) + 2 for t in request.inputs)))

    async def served_models(self) -> set[str]:
        return {"tiny:1"}

    async def prepare(self, credential: Credential, params: ChatParams, request_id: str = "",
                      screening: object = None, *, overlap: bool = False, continues: str = "") -> Prepared:
        try:
            version = await self.models.resolve(params.model)
        except NotFound:
            await self.authenticate(credential)  # as ChatService: no model probing without a key
            raise
        await self.authenticate(credential)
        if version is HIDDEN:
            raise PermissionDenied("model secret:1 is not allowed for key key_1", reason=Reason.MODEL_NOT_ALLOWED)
        problems: dict[str, Exception] = {
            "busy": ResourceExhausted("every replica's queue is full", 1.0, reason=Reason.QUEUE_FULL),
            "down": Unavailable("no passing instance of lmesh-tokenizer"),
            "slow": DeadlineExceeded("deadline exceeded"),
            "bug": RuntimeError("a bug in the gateway"),
        }
        if params.model in problems:
            raise problems[params.model]
        prompt = [1] * sum(len(content.split()) for _, content in params.messages)
        if len(prompt) >= self.context:
            raise InvalidArgument("messages", f"the prompt is {len(prompt)} tokens; the model's context is "
                                              f"{self.context}")
        self.seen.append(params)
        return Prepared(version, prompt, min(params.max_tokens, self.context - len(prompt)), None,  # type: ignore[arg-type]
                        decided(policy_pb2.ReserveResponse(reservation_id=request_id, limits=self.key_limits,
                                                           key_window=self.key_window)), tenant="acme")

    async def generate(self, version: object, prompt: list[int], max_tokens: int, params: ChatParams,
                       cancel: asyncio.Event, request_id: str = "", tokenizer: object = None,
                       meter: Meter | None = None, *, priority: int = 0,
                       placement: object = None) -> AsyncIterator[ChatDelta | ChatEnd]:
        produced = 0
        self.generations += 1
        if meter is not None:
            meter.started(len(prompt))
        try:
            words = ANSWER * 10_000 if params.model == "endless" else ANSWER[:max_tokens]  # endless: past max_tokens
            for word in words:
                if cancel.is_set():
                    break
                produced += 1
                if meter is not None:
                    meter.received(1)
                self.generating.set()
                if params.model == "late" and produced == 2:
                    raise Unavailable("inference replica 127.0.0.1:1 became unavailable")
                entries = [TokenLogprob(Candidate(produced, word.encode(), -0.25 * produced),
                                        tuple(Candidate(900 + i, f"alt{i}".encode(), -3.0 - i)
                                              for i in range(params.top_logprobs)))] if params.logprobs else []
                yield ChatDelta(word, entries)
                if params.model == "endless":
                    await asyncio.sleep(0.01)
            reason = (generation_pb2.FINISH_REASON_CANCELLED if cancel.is_set() else
                      generation_pb2.FINISH_REASON_LENGTH if produced == max_tokens and produced < len(ANSWER) else
                      generation_pb2.FINISH_REASON_STOP)
            usage = generation_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=produced,
                                         total_tokens=len(prompt) + produced, cached_prompt_tokens=2)
            if meter is not None:
                meter.finished(usage, cancel.is_set())
            yield ChatEnd(reason, usage)
        finally:
            self.stopped.set()


@dataclass
class Served:
    door: HttpDoor
    chat: FakeChat
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.door.port}"

    def sdk(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0)


@contextlib.asynccontextmanager
async def serve(grace_s: float = 2.0, cors_origins: tuple[str, ...] = ()) -> AsyncIterator[Served]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("lmesh.gateway")
    chat = FakeChat()
    app = OpenAIApp(chat, provider.get_tracer("test"), GatewayMetrics(meter), meter)  # type: ignore[arg-type]
    door = HttpDoor(app, ServiceConfig(service="gateway", grace_s=grace_s), 0, "--http-port",
                    cors_origins=cors_origins)
    await door.start()
    try:
        yield Served(door, chat, spans, reader)
    finally:
        await door.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def served() -> AsyncIterator[Served]:
    async with serve() as running:
        yield running


async def post(served: Served, path: str, body: Any, key: str | None = KEY,
               headers: dict[str, str] | None = None) -> httpx2.Response:
    sent = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx2.AsyncClient(base_url=served.base, timeout=10) as client:
        return await client.post(path, content=content, headers=sent)


def assert_openai_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and "Traceback" not in error["message"]
    return error


# ---- the SDK ------------------------------------------------------------------------------------------------


async def test_the_sdk_lists_and_retrieves_the_models_the_key_may_use(served: Served) -> None:
    client = served.sdk()
    listed = await client.models.list()
    assert [m.id for m in listed.data] == ["tiny:1"]
    model = listed.data[0]
    assert (model.object, model.created, model.owned_by) == ("model", 1_700_000_000, "lmesh")
    assert model.model_extra == {"aliases": ["default"], "context_length": 64, "served": True}
    assert (await client.models.retrieve("default")).id == "tiny:1"  # an alias: the version it resolves to
    for hidden in ("nope", "secret", "x" * 128):  # unknown, not allowed for the key
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve(hidden)
        assert caught.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        await served.sdk("lmk_bad").models.retrieve("default")  # the key first: no probing for models
    for malformed in ("a b", "x" * 300, "a:b:c"):  # its form before anything, as in a chat: with or without a key
        for sdk in (client, served.sdk("lmk_bad")):
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.models.retrieve(malformed)
            assert (refused.value.code, refused.value.param) == ("invalid_value", "model"), refused.value.body


async def test_the_sdk_embeds_as_floats_and_as_base64(served: Served) -> None:
    client = served.sdk()
    answer = await client.embeddings.create(model="mini", input=["one two", "three"])
    assert [(e.index, e.embedding) for e in answer.data] == [(0, pytest.approx([0.6, 0.8])),
                                                             (1, pytest.approx([0.6, 0.8]))]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 7
    # The SDK asks for base64 by default when numpy is there and decodes it: the same floats.
    raw = await post(served, "/v1/embeddings", {"input": "one", "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.tolist() == pytest.approx([0.6, 0.8])
    for body, param in (({"input": []}, "input"), ({"input": [1, 2]}, "input[0]"), ({}, "input"),
                        ({"input": "x", "dimensions": 12}, "dimensions")):
        error = assert_openai_error(await post(served, "/v1/embeddings", body), 400)
        assert error["param"] == param
    assert_openai_error(await post(served, "/v1/embeddings", {"input": "x", "model": "ada"}), 404)
    assert_openai_error(await post(served, "/v1/embeddings", {"input": "x"}, key="lmk_bad"), 401)


async def test_the_sdk_chats_whole_and_streamed_with_the_same_answer_and_usage(served: Served) -> None:
    client = served.sdk()
    whole = await client.chat.completions.create(model="default", messages=USER)  # type: ignore[arg-type]
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == "tiny:1"
    [choice] = whole.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant", "".join(ANSWER), "stop")
    assert whole.usage is not None and whole.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 2},
        "lmesh": {"cached_response": False}}
    stream = await client.chat.completions.create(model="default", messages=USER, stream=True,  # type: ignore[arg-type]
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(ANSWER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1
    # Without include_usage: no usage chunk.
    plain = [c async for c in await client.chat.completions.create(  # type: ignore[call-overload]
        model="default", messages=USER, stream=True)]
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


async def test_max_tokens_or_max_completion_tokens_cut_the_answer_with_length(served: Served) -> None:
    client = served.sdk()
    for limit in ({"max_tokens": 2}, {"max_completion_tokens": 2}, {"max_tokens": 5, "max_completion_tokens": 2}):
        answer = await client.chat.completions.create(model="tiny", messages=USER, **limit)  # type: ignore[call-overload]
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("Paris is", "length")
    assert served.chat.seen[-1].max_tokens == 2
    await client.chat.completions.create(model="tiny", messages=USER)  # type: ignore[arg-type]
    assert served.chat.seen[-1].max_tokens == 2**31 - 1  # neither: the rest of the context (prepare clips it)


async def test_openais_penalties_and_logit_bias_reach_the_request_path(served: Served) -> None:
    client = served.sdk()
    await client.chat.completions.create(model="tiny", messages=USER, presence_penalty=0.5,  # type: ignore[arg-type]
                                         frequency_penalty=-1.25, logit_bias={"42": -100, "7": 2.5, "9": 0})
    params = served.chat.seen[-1]
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.25)
    assert params.logit_bias == ((7, 2.5), (9, 0.0), (42, -100.0))  # by id
    await client.completions.create(model="tiny", prompt="x", frequency_penalty=2, logit_bias={"0": 1})
    params = served.chat.seen[-1]
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (0.0, 2.0, ((0, 1.0),))
    await client.chat.completions.create(model="tiny", messages=USER, presence_penalty=None,  # type: ignore[arg-type]
                                         logit_bias=None)
    params = served.chat.seen[-1]
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (0.0, 0.0, ())


async def test_the_sdk_completes_a_prompt_as_one_user_turn(served: Served) -> None:
    client = served.sdk()
    completion = await client.completions.create(model="default", prompt="What is the capital of France?")
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "".join(ANSWER) and completion.choices[0].finish_reason == "stop"
    params = served.chat.seen[-1]
    assert params.messages == [("user", "What is the capital of France?")]
    assert params.max_tokens == 16 and params.temperature == 1.0  # OpenAI's defaults
    streamed = [c async for c in await client.completions.create(model="default", prompt=["Hi"], stream=True,
                                                                   stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "".join(ANSWER)
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == len(ANSWER)


async def test_logprobs_come_in_openais_chat_and_legacy_forms(served: Served) -> None:
    client = served.sdk()
    chat = await client.chat.completions.create(model="tiny", messages=USER, logprobs=True,  # type: ignore[arg-type]
                                                top_logprobs=2)
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [e.token for e in logprobs.content] == ANSWER
    first = logprobs.content[0]
    assert (first.logprob, first.bytes) == (-0.25, list(b"Paris"))
    assert [(a.token, a.logprob, a.bytes) for a in first.top_logprobs] == [("alt0", -3.0, list(b"alt0")),
                                                                          ("alt1", -4.0, list(b"alt1"))]
    streamed = [c async for c in await client.chat.completions.create(  # type: ignore[call-overload]
        model="tiny", messages=USER, logprobs=True, stream=True)]
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == ANSWER and all(e.top_logprobs == [] for e in entries)
    legacy = await client.completions.create(model="tiny", prompt="Hi", logprobs=1, max_tokens=3)
    assert legacy.choices[0].logprobs is not None
    assert legacy.choices[0].logprobs.model_dump() == {
        "tokens": ["Paris", " is", " the"], "token_logprobs": [-0.25, -0.5, -0.75],
        "top_logprobs": [{"alt0": -3.0}] * 3, "text_offset": [0, 5, 8]}
    assert (await client.completions.create(model="tiny", prompt="Hi")).choices[0].logprobs is None


async def test_n_choices_run_in_parallel_with_seeds_one_apart(served: Served) -> None:
    client = served.sdk()
    before = len(served.chat.seen)
    answer = await client.chat.completions.create(model="tiny", messages=USER, n=3, seed=41,  # type: ignore[arg-type]
                                                  user="session-7")
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer._request_id is not None and len(answer._request_id) == 32  # the trace id, as the SDK shows it
    assert all(c.message.content == "".join(ANSWER) for c in answer.choices)
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 21)
    seen = served.chat.seen[before:]
    assert sorted(p.seed for p in seen) == [41, 42, 43]
    assert {p.session for p in seen} == {"session-7"}  # `user`: the request path's session
    chunks = [c async for c in await client.chat.completions.create(  # type: ignore[call-overload]
        model="tiny", messages=USER, n=2, stream=True)]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "stop"
        assert "".join(c.delta.content or "" for c in mine) == "".join(ANSWER)


async def test_several_prompts_are_answered_in_one_response_prompt_by_prompt(served: Served) -> None:
    client = served.sdk()
    prompts = ["Hi", "What is the capital of France?"]  # 1 and 6 tokens here
    before = len(served.chat.seen)
    answer = await client.completions.create(model="tiny", prompt=prompts, n=2, seed=7, max_tokens=3, logprobs=1)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert all(c.text == "Paris is the" and c.finish_reason == "length" for c in answer.choices)
    assert all(c.logprobs is not None and c.logprobs.tokens == ["Paris", " is", " the"] for c in answer.choices)
    # Each prompt counted once, whatever its n; every choice's completion.
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (7, 12, 19)
    assert answer.usage.prompt_tokens_details is not None and answer.usage.prompt_tokens_details.cached_tokens == 4
    asked = sorted((p.messages[0][1], p.seed) for p in served.chat.seen[before:])
    assert asked == sorted((prompt, seed) for prompt in prompts for seed in (7, 8))

    before = len(served.chat.seen)
    chunks = [c async for c in await client.completions.create(  # type: ignore[call-overload]
        model="tiny", prompt=prompts, stream=True, stream_options={"include_usage": True})]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == "".join(ANSWER) and mine[-1].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7
    assert sorted(p.messages[0][1] for p in served.chat.seen[before:]) == sorted(prompts)
    # One prompt in an array is that prompt.
    single = await client.completions.create(model="tiny", prompt=["Hi"], max_tokens=2)
    assert [c.text for c in single.choices] == ["Paris is"] and single.usage is not None
    assert single.usage.prompt_tokens == 1


PAGE = "https://chat.example.com"
PREFLIGHT = {"origin": PAGE, "access-control-request-method": "POST",
             "access-control-request-headers": "authorization,content-type,x-stainless-os"}


async def test_pages_of_the_named_origins_may_call_the_api_from_a_browser() -> None:
    async with serve(cors_origins=(PAGE, "http://localhost:3000")) as cors, \
            httpx2.AsyncClient(base_url=cors.base, timeout=10) as client:
        before = cors.chat.generations
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 204 and preflight.content == b""
        assert preflight.headers["access-control-allow-origin"] == PAGE
        assert preflight.headers["access-control-allow-methods"] == "GET, POST"
        assert preflight.headers["access-control-allow-headers"] == "authorization,content-type,x-stainless-os"
        assert preflight.headers["vary"] == "origin" and "access-control-allow-credentials" not in preflight.headers
        assert cors.chat.generations == before  # a preflight runs nothing
        # The calls themselves, answers, errors and streams alike, say the page may read them.
        answered = await post(cors, "/v1/chat/completions", {"model": "tiny", "messages": USER},
                              headers={"origin": PAGE})
        refused = await post(cors, "/v1/chat/completions", {"model": "tiny", "messages": USER}, key="lmk_bad",
                             headers={"origin": "http://localhost:3000"})
        streamed = await post(cors, "/v1/chat/completions", {"model": "tiny", "messages": USER, "stream": True},
                              headers={"origin": PAGE})
        models = await client.get("/v1/models", headers={"origin": PAGE, "authorization": f"Bearer {KEY}"})
        for response, status, origin in ((answered, 200, PAGE), (refused, 401, "http://localhost:3000"),
                                         (streamed, 200, PAGE), (models, 200, PAGE)):
            assert response.status_code == status, response.text
            assert response.headers["access-control-allow-origin"] == origin
            exposed = response.headers["access-control-expose-headers"]
            assert {"retry-after", "retry-after-ms", "x-lmesh-trace-id", "x-request-id"} <= set(exposed.split(", "))
        assert streamed.text.endswith("data: [DONE]\n\n")
        # Another origin's page gets no CORS headers: its browser keeps the answers from it.
        other = {**PREFLIGHT, "origin": "https://evil.example.com"}
        assert (await client.options("/v1/chat/completions", headers=other)).status_code == 405
        answered = await post(cors, "/v1/chat/completions", {"model": "tiny", "messages": USER},
                              headers={"origin": "https://evil.example.com"})
        assert answered.status_code == 200 and "access-control-allow-origin" not in answered.headers
    async with serve(cors_origins=("*",)) as anyone, httpx2.AsyncClient(base_url=anyone.base, timeout=10) as client:
        preflight = await client.options("/v1/models", headers=PREFLIGHT)
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "*"


async def test_without_cors_origins_no_page_is_let_in(served: Served) -> None:
    async with httpx2.AsyncClient(base_url=served.base, timeout=10) as client:
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    answered = await post(served, "/v1/chat/completions", {"model": "tiny", "messages": USER}, headers={"origin": PAGE})
    assert answered.status_code == 200 and "access-control-allow-origin" not in answered.headers


async def test_unknown_fields_are_ignored_and_text_parts_joined(served: Served) -> None:
    response = await post(served, "/v1/chat/completions", {
        "model": "tiny", "store": True, "metadata": {"a": "b"}, "parallel_tool_calls": False, "service_tier": "auto",
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0,
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Capital"},
                                                                 {"type": "text", "text": "of France?"}]}]})
    assert response.status_code == 200, response.text
    assert served.chat.seen[-1].messages == [("system", "Be brief."), ("user", "Capital\nof France?")]


# ---- errors -------------------------------------------------------------------------------------------------


async def test_errors_map_to_openais_shape_status_and_sdk_exceptions(served: Served) -> None:
    client = served.sdk()
    cases: list[tuple[openai.AsyncOpenAI, str, type[openai.APIStatusError], int, str]] = [
        (served.sdk("lmk_bad"), "tiny", openai.AuthenticationError, 401, "invalid_api_key"),
        (served.sdk("lmk_bad"), "nope", openai.AuthenticationError, 401, "invalid_api_key"),  # the key first
        (client, "nope", openai.NotFoundError, 404, "model_not_found"),
        (client, "secret", openai.PermissionDeniedError, 403, "model_not_allowed"),
        (client, "busy", openai.RateLimitError, 429, "queue_full"),
        (client, "down", openai.InternalServerError, 503, "unavailable"),
        (client, "slow", openai.InternalServerError, 504, "dependency_timeout"),
        (client, "bug", openai.InternalServerError, 500, "internal"),
    ]
    for sdk, model, kind, status, code in cases:
        for stream in (False, True):
            with pytest.raises(kind) as caught:
                answer = await sdk.chat.completions.create(model=model, messages=USER,  # type: ignore[call-overload]
                                                           stream=stream)
                if stream:
                    _ = [c async for c in answer]
            error = caught.value
            assert (error.status_code, error.code) == (status, code), (model, stream, error.body)
            assert "Traceback" not in error.response.text
    busy = await post(served, "/v1/chat/completions", {"model": "busy", "messages": USER})
    assert_openai_error(busy, 429)
    assert (busy.headers["retry-after"], busy.headers["retry-after-ms"]) == ("1", "1000")
    bug = assert_openai_error(await post(served, "/v1/completions", {"model": "bug", "prompt": "x"}), 500)
    assert bug["message"].startswith("internal error (trace_id=") and "a bug" not in bug["message"]
    missing = await post(served, "/v1/chat/completions", {"model": "tiny", "messages": USER}, key=None)
    assert assert_openai_error(missing, 401)["message"].startswith("missing API key")
    assert missing.headers["www-authenticate"] == "Bearer"
    basic = await post(served, "/v1/chat/completions", {"model": "tiny", "messages": USER}, key=None,
                       headers={"authorization": "Basic Zm9vOmJhcg=="})
    assert assert_openai_error(basic, 401)["message"] == ("the Authorization header's scheme must be Bearer, got "
                                                          "'Basic': send 'Authorization: Bearer <key>'")


async def test_an_error_after_the_stream_started_is_an_error_event_and_the_stream_ends(served: Served) -> None:
    with pytest.raises(openai.APIError) as caught:
        _ = [c async for c in await served.sdk().chat.completions.create(  # type: ignore[call-overload]
            model="late", messages=USER, stream=True)]
    assert caught.value.body == {"message": "inference replica 127.0.0.1:1 became unavailable",
                                 "type": "server_error", "param": None, "code": "unavailable"}
    response = await post(served, "/v1/chat/completions", {"model": "late", "messages": USER, "stream": True})
    assert response.status_code == 200  # it went out with the first delta
    events = response.text.split("\n\n")
    assert events[0].startswith("data: {") and events[1].startswith("event: error\ndata: {")
    assert json.loads(events[1].split("data: ", 1)[1])["error"]["code"] == "unavailable"
    assert "[DONE]" not in response.text


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, "temperature", "must be a number or null"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 2.5}, "temperature", "must be in [0, 2]"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": True}, "max_tokens", "must be an integer or null"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 1.5}, "max_tokens", "must be an integer"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens", "[1, "),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 3}, "top_logprobs", "needs logprobs set to true"),
    ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"messages": USER, "n": 9}, "n", "must be 1 to 8"),
    ("/v1/chat/completions", {"messages": USER, "n": 0}, "n", "must be 1 to 8"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function", "is required"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice", "needs tools to call"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_schema"}},
     "response_format.json_schema", "is required"),
    ("/v1/chat/completions", {"messages": USER, "presence_penalty": 2.5}, "presence_penalty", "must be in [-2"),
    ("/v1/chat/completions", {"messages": USER, "frequency_penalty": "x"}, "frequency_penalty", "must be a number"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"1": 101}}, "logit_bias.1", "must be in [-100"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"1": "x"}}, "logit_bias.1", "must be a number"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"the": 5}}, "logit_bias.the", "allowed member name"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"-1": 5}}, "logit_bias.-1", "allowed member name"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": [1]}, "logit_bias", "must be an object"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias",
     "at most 1024 members"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("/v1/chat/completions", {"messages": USER, "stop": [""]}, "stop[0]", "1 to 64 characters"),
    ("/v1/chat/completions", {"messages": USER, "seed": 2**63}, "seed", "must be in"),
    ("/v1/chat/completions", {"messages": USER, "user": 7}, "user", "must be a string"),
    ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", "must be a boolean"),
    ("/v1/chat/completions", {"messages": USER, "model": "a b"}, "model", "is not `name:version`"),
    ("/v1/chat/completions", {"messages": []}, "messages", "must not be empty"),
    ("/v1/chat/completions", {}, "messages", "is required"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "must be system"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "must be a string or an array"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", "only text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " ".join(["w"] * 70)}]}, "messages",
     "context"),  # past the form: the request path's own check (prepare), param as the request names it
    # Large bodies are checked in a worker thread: the same answers.
    ("/v1/chat/completions", {"messages": [*USER * 20_000, {"role": "robot", "content": "x"}]}, "messages[20000].role",
     "must be system"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w " * 40_000}]}, "messages", "context"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt", "token ids"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt", "token ids"),
    ("/v1/completions", {"prompt": [None]}, "prompt[0]", "must be a string"),
    ("/v1/completions", {"prompt": ["a"] * 9}, "prompt", "an array of 1 to 8 strings"),
    ("/v1/completions", {"prompt": ["a", {"text": "b"}]}, "prompt[1]", "must be a string"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "n", "at most 2 with 3 prompts"),
    ("/v1/completions", {"prompt": ["a", " ".join(["w"] * 70)]}, "prompt", "context"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "[0, 20]"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo", "not supported"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "use n"),
    ("/v1/completions", {"prompt": " ".join(["w"] * 70)}, "prompt", "context"),
])
async def test_a_bad_field_is_400_naming_it_as_the_request_spelled_it(served: Served, path: str, body: dict[str, Any],
                                                                      param: str, words: str) -> None:
    error = assert_openai_error(await post(served, path, {"model": "tiny", **body}), 400)
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", "invalid_value")
    assert error["message"].startswith(f"{param}: ") and words in error["message"], error


@pytest.mark.parametrize("body, words", [
    (b"{", "the body is not JSON"),
    (b'{"messages": NaN}', "the body is not JSON"),
    (b"[]", "must be a JSON object, got array"),
    (b"\xff\xfe", "the body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}).encode(), "lone surrogate"),
    (json.dumps({"messages": [{"role": "\ud800", "content": "x"}]}).encode(), "must be system"),
])
async def test_a_body_that_is_not_a_json_object_is_400_with_or_without_a_key(served: Served, body: bytes,
                                                                             words: str) -> None:
    for key in (KEY, None):  # the form first, then the key
        error = assert_openai_error(await post(served, "/v1/chat/completions", body, key=key), 400)
        assert words in error["message"], error


async def test_the_http_layers_own_refusals_are_in_openais_shape_too(served: Served) -> None:
    huge = await post(served, "/v1/chat/completions", b"{" + b" " * (4 * 1024 * 1024) + b"}")
    assert assert_openai_error(huge, 413)["code"] == "request_too_large"
    async with httpx2.AsyncClient(base_url=served.base, timeout=10) as client:
        assert assert_openai_error(await client.get("/v1/nothing"), 404)["code"] == "not_found"
        wrong = await client.get("/v1/chat/completions")
        assert assert_openai_error(wrong, 405)["code"] == "method_not_allowed" and wrong.headers["allow"] == "POST"
        assert (await client.get("/openapi.json")).json()["openapi"] == "3.1.0"


# ---- cancellation, drain, telemetry ---------------------------------------------------------------------------


async def test_a_client_that_disconnects_mid_stream_stops_the_generation_at_once() -> None:
    async with serve() as running:
        body = {"model": "endless", "messages": USER, "stream": True}
        async with httpx2.AsyncClient(base_url=running.base, timeout=10) as client, client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            lines = [line async for line in _first_events(response, 5)]
            assert all(line.startswith("data: {") for line in lines)
            assert not running.chat.stopped.is_set()
        # The connection closed: the generator is closed within a moment (the fake makes a delta every 10 ms).
        await asyncio.wait_for(running.chat.stopped.wait(), 1.0)
        for _ in range(100):
            if not running.door.app.in_flight:
                break
            await asyncio.sleep(0.01)
        assert running.door.app.in_flight == 0
    # Its reservation is settled as the client's going away, with the tokens it had been sent.
    [meter] = running.chat.accounts.settled.values()
    assert meter.ending == policy_pb2.ENDING_CLIENT_GONE and meter.completion_tokens >= 5
    counted = {dict(point.attributes)["rpc.response.status_code"]: point.value
               for metric in _metrics(running.metrics, "lmesh.gateway.requests") for point in metric.data.data_points}
    assert counted == {"CANCELLED": 1}
    [span] = [s for s in running.spans.get_finished_spans() if s.name == "lmesh.gateway/POST /v1/chat/completions"]
    assert [e.name for e in span.events] == ["cancelled by the client"]


async def _first_events(response: httpx2.Response, count: int) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line:
            yield line
            count -= 1
            if not count:
                return


async def test_a_non_streaming_chat_whose_client_leaves_is_cancelled_too() -> None:
    async with serve() as running:
        async with httpx2.AsyncClient(base_url=running.base, timeout=0.3) as client:
            with pytest.raises(httpx2.TimeoutException):
                await client.post("/v1/chat/completions", json={"model": "endless", "messages": USER},
                                  headers={"authorization": f"Bearer {KEY}"})
        await asyncio.wait_for(running.chat.stopped.wait(), 1.0)
        [meter] = running.chat.accounts.settled.values()
        assert meter.ending == policy_pb2.ENDING_CLIENT_GONE


async def test_a_drain_lets_streams_run_then_ends_them_draining_before_the_grace_runs_out() -> None:
    async with serve(grace_s=1.0) as running:
        body = {"model": "endless", "messages": USER, "stream": True}
        async with httpx2.AsyncClient(base_url=running.base, timeout=10) as client, client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}) as response:
            lines = response.aiter_lines()
            await anext(lines)
            await running.door.drain()
            started = asyncio.get_running_loop().time()
            text = "".join([line + "\n" async for line in lines])
            took = asyncio.get_running_loop().time() - started
        assert 0.5 <= took < 1.0, took  # it ran on until a moment before the grace ended
        last = text.strip().split("\n\n")[-1]
        assert last.startswith("event: error\ndata: ")
        error = json.loads(last.split("data: ", 1)[1])["error"]
        assert error == {"message": "lmesh-gateway shut down before this stream finished (its --grace of 1 s was "
                                    "running out); retry", "type": "server_error", "param": None, "code": "draining"}
        with pytest.raises(httpx2.ConnectError):  # no new connections while draining
            async with httpx2.AsyncClient(base_url=running.base, timeout=2) as client:
                await client.get("/v1/models")


async def test_the_keys_rate_limits_come_as_openais_headers(served: Served) -> None:
    plain = await post(served, "/v1/chat/completions", {"model": "tiny", "messages": USER})
    assert not [name for name in plain.headers if name.startswith("x-ratelimit-")]  # a key without rate limits
    served.chat.key_limits = policy_pb2.Limits(requests_per_minute=60, tokens_per_minute=1000, budget_tokens=10**6)
    served.chat.key_window = policy_pb2.RateWindow(requests=3, tokens=1200, oldest_leaves_in_ms=8640)
    try:
        whole = await post(served, "/v1/chat/completions", {"model": "tiny", "messages": USER})
        streamed = await post(served, "/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "stream": True})
        served.chat.key_limits = policy_pb2.Limits(tokens_per_minute=500)
        tokens_only = await served.sdk().chat.completions.with_raw_response.create(model="tiny", messages=USER)  # type: ignore[arg-type]
    finally:
        served.chat.key_limits = served.chat.key_window = None
    for response in (whole, streamed):
        assert response.status_code == 200, response.text
        assert {name: value for name, value in response.headers.items() if name.startswith("x-ratelimit-")} == {
            "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "57",
            "x-ratelimit-reset-requests": "8.64s", "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "0",  # held beyond the limit by reservations made before it was lowered
            "x-ratelimit-reset-tokens": "8.64s"}
    assert tokens_only.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-limit-requests" not in tokens_only.headers


@pytest.mark.parametrize("ms, written", [(0, "0ms"), (20, "20ms"), (999, "999ms"), (1000, "1s"), (8640, "8.64s"),
                                         (59_999, "59.999s"), (60_000, "1m0s"), (61_500, "1m1.5s")])
def test_a_reset_is_written_as_openai_writes_it(ms: int, written: str) -> None:
    assert openai_duration(ms) == written


async def test_health_answers_load_balancers_without_a_key(served: Served) -> None:
    async with httpx2.AsyncClient(base_url=served.base, timeout=10) as client:
        serving = await client.get("/health")
        assert (serving.status_code, serving.json()) == (200, {"status": "serving"})
        served.door.app.draining = True  # as from the drain on, for a request on a connection still open
        try:
            draining = await client.get("/health")
        finally:
            served.door.app.draining = False
        assert (draining.status_code, draining.json()) == (503, {"status": "draining"})
        assert (await client.post("/health")).status_code == 405


async def test_http_chats_are_spans_and_metrics_of_the_gateway(served: Served) -> None:
    served.spans.clear()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = await post(served, "/v1/chat/completions", {"model": "default", "messages": USER},
                          headers={"traceparent": traceparent})
    [span] = [s for s in served.spans.get_finished_spans() if s.name == "lmesh.gateway/POST /v1/chat/completions"]
    assert f"{span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"  # the caller's trace
    assert response.headers["x-lmesh-trace-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert response.headers["x-request-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"  # what OpenAI's SDKs show
    attributes = dict(span.attributes or {})
    assert attributes["http.response.status_code"] == 200 and attributes["gen_ai.response.model"] == "tiny:1"
    assert attributes["gen_ai.usage.output_tokens"] == len(ANSWER)
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    durations = _metrics(served.metrics, "http.server.request.duration")
    assert any(dict(p.attributes).get("http.route") == "/v1/chat/completions" for m in durations
               for p in m.data.data_points)


def _metrics(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    return [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == name]


# ---- settings and the port ------------------------------------------------------------------------------------


def test_the_http_port_must_differ_from_the_gateways_other_ports(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        GatewaySettings(tls_cert=tmp_path, tls_key=tmp_path, tls_client_ca=tmp_path, tls_client_cert_port=9000,
                        http_port=9000)
    assert str(caught.value) == ("--http-port (LMESH_HTTP_PORT) must be another port than --tls-client-cert-port "
                                 "(LMESH_TLS_CLIENT_CERT_PORT) (9000)")
    app = OpenAIApp(FakeChat(), trace.get_tracer("test"))  # type: ignore[arg-type]
    with pytest.raises(OSError) as failed:
        HttpDoor(app, ServiceConfig(service="gateway", port=9001), 9001, "--http-port (LMESH_HTTP_PORT)").check()
    assert str(failed.value) == "--http-port (LMESH_HTTP_PORT) must be another port than --port (9001)"


async def test_a_taken_http_port_is_refused_at_start_in_one_line(served: Served) -> None:
    app = OpenAIApp(FakeChat(), trace.get_tracer("test"))  # type: ignore[arg-type]
    door = HttpDoor(app, ServiceConfig(service="gateway"), served.door.port, "--http-port (LMESH_HTTP_PORT)")
    with pytest.raises(OSError) as failed:
        door.check()
    assert str(failed.value) == (f"could not listen on 127.0.0.1:{served.door.port} (--http-port (LMESH_HTTP_PORT)): "
                                 "the port is in use; stop what listens there or pick another with --http-port "
                                 "(LMESH_HTTP_PORT)")


# ---- hostile bodies -------------------------------------------------------------------------------------------

def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           _nested, max_leaves=12)
FIELDS = sorted({*CHAT_REQUEST["properties"], *COMPLETION_REQUEST["properties"]})
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", 3, None]),
                                           "content": JSON_VALUES}), max_size=3)
BODIES = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON_VALUES, max_size=6) | st.builds(
    lambda fields, messages, prompt: {**fields, "messages": messages, "prompt": prompt},
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5), MESSAGES, JSON_VALUES)


async def asgi(app: OpenAIApp, path: str, body: bytes) -> tuple[int, bytes]:
    """One request straight into the ASGI app (no sockets), with a valid key."""
    sent: list[dict[str, Any]] = []
    answered = asyncio.Event()
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:  # the body, then a disconnect once the answer is complete
        if requests:
            return requests.pop()
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    scope = {"type": "http", "method": "POST", "path": path, "scheme": "http",
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=BODIES)
def test_hostile_json_bodies_get_a_4xx_in_openais_shape_or_an_answer_never_a_5xx(path: str,
                                                                                  body: dict[str, Any]) -> None:
    app = OpenAIApp(FakeChat(accept_any=True), trace.get_tracer("test"))  # type: ignore[arg-type]
    status, answer = asyncio.run(asgi(app, path, json.dumps(body).encode()))
    assert status < 500, (status, answer)
    parsed = json.loads(answer) if not answer.startswith(b"data:") else None
    if status >= 400:
        assert parsed is not None and set(parsed["error"]) == {"message", "type", "param", "code"}, answer


# schemathesis: every route of /openapi.json, schema-valid and schema-breaking requests; its checks hold the
# document to the behaviour (documented statuses and bodies, valid data accepted, invalid data refused, no 5xx).
# A context no generated prompt outgrows: a prompt too long for it is a 400 the schema cannot describe (tested above).
FUZZED = OpenAIApp(FakeChat(accept_any=True, context=10**9), trace.get_tracer("test"))  # type: ignore[arg-type]
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", FUZZED)
SCHEMA.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
# A schema-breaking body can be huge (a long `input` array): refusing it with the documented 413 is a rejection too.
_REJECTION = SCHEMA.config.checks.negative_data_rejection
_REJECTION.expected_statuses = [*_REJECTION.expected_statuses, "413"]


@SCHEMA.auth()
class Bearer:
    """The key, as the document's `bearer` scheme says (schemathesis also tries without it: 401)."""

    def get(self, case: schemathesis.Case, context: object) -> str:
        return KEY

    def set(self, case: schemathesis.Case, data: str, context: object) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@SCHEMA.parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_openapi_document_describes_what_is_served(case: schemathesis.Case) -> None:
    response = case.call_and_validate()
    assert response.status_code < 500
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("schema", "field", "allowed", "refused"), [
    ("EMBEDDINGS_REQUEST", "encoding_format", ["float", "base64", None], ["hex"]),
    ("COMPLETION_REQUEST", "echo", [False, None], [True]),
])
def test_a_nullable_enum_lists_null_so_the_document_allows_what_is_accepted(schema: str, field: str,
                                                                           allowed: list[Any], refused: list[Any],
                                                                           ) -> None:
    import jsonschema

    from services.gateway import openai_api

    properties = getattr(openai_api, schema)["properties"]
    validator = jsonschema.Draft202012Validator({"type": "object", "properties": {field: properties[field]}})
    assert [validator.is_valid({field: value}) for value in allowed] == [True] * len(allowed)
    assert [validator.is_valid({field: value}) for value in refused] == [False] * len(refused)

"""Structured generation: the constraint module (compiling, masks checked against the tokenizer, the masked sampler),
the engine on the real model (JSON Schema, regex and Lark constraints among free rows; greedy, sampled, seeded,
top_logprobs, repetition penalty, prefix cache), a Hypothesis property over generated JSON Schemas on the tiny random
model (tests/tiny_model.py: its choices are as arbitrary as a constraint must withstand), and the contract over gRPC
(a bad constraint is INVALID_ARGUMENT naming its field)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import numpy as np
import pytest
import pytest_asyncio
import regex
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from lmesh.common.v1 import generation_pb2
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from services.common.discovery import SERVER_OPTIONS
from services.common.errors import InvalidArgument
from services.common.rpc import ServerInterceptor
from services.inference.constrained import (
    MASKED,
    MAX_CONSTRAINT_BYTES,
    CompiledConstraint,
    ConstraintSpec,
    Grammars,
    RowMasks,
)
from services.inference.engine import Engine, ErrorEvent, Finish, FinishEvent, GenerationRequest, Sequence, TokenEvent
from services.inference.loader import GrammarCache
from services.inference.metrics import InferenceMetrics
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import Sampled, Sampler, SamplingConfig
from services.inference.servicer import InferenceServicer, ServedModel
from tests.test_e2e import typed_details
from tests.test_inference_priority import MODEL, read_rest

EOS = 2
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0},
        "kind": {"enum": ["capital", "town", "village"]},
        "neighbours": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["city", "population", "kind", "neighbours"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def grammars(built_model: Path) -> Grammars:
    return Grammars.from_tokenizer_json((built_model / "tokenizer.json").read_text(encoding="utf-8"), [EOS])


@pytest.fixture(scope="module")
def decoder(built_model: Path) -> OnnxDecoder:
    return OnnxDecoder(built_model / "model.onnx")


@pytest.fixture(scope="module")
def chat(built_model: Path) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(built_model / "tokenizer.json"))

    def encode(question: str) -> list[int]:
        return tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                                add_special_tokens=False).ids
    return encode


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def engine(decoder: OnnxDecoder) -> AsyncIterator[Engine]:
    engine = Engine(decoder, frozenset({EOS}), context_length=8192)
    engine.start()
    yield engine
    await engine.close()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def tiny_engine(tiny_model: Path) -> AsyncIterator[Engine]:
    """An engine on the tiny random model (tests/tiny_model.py): what it samples under a constraint is as arbitrary
    as a constraint must withstand, many times faster than the real model."""
    engine = Engine(OnnxDecoder(tiny_model / "model.onnx", threads=1), frozenset({EOS}), context_length=8192)
    engine.start()
    yield engine
    await engine.close()


def text_of(grammars: Grammars, tokens: list[int]) -> str:
    return grammars.tokenizer.decode_bytes(tokens).decode("utf-8")


async def drain(seq: Sequence) -> tuple[list[Sampled], FinishEvent]:
    sampled: list[Sampled] = []
    while True:
        event = await seq.events.get()
        if isinstance(event, TokenEvent):
            sampled.append(event.sampled)
        elif isinstance(event, ErrorEvent):
            raise event.error
        else:
            return sampled, event


def constrained(prompt: list[int], compiled: CompiledConstraint | None, max_tokens: int = 96,
                top_logprobs: int = 0, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, sampling=SamplingConfig(**sampling),
                             top_logprobs=top_logprobs, constraint=compiled)


# ---- the constraint module ------------------------------------------------------------------------------------

def test_every_allowed_token_keeps_the_text_a_prefix_and_every_other_breaks_it(grammars: Grammars) -> None:
    """Masks checked against the tokenizer with an independent matcher (the `regex` module's partial matching):
    at each step of a valid text, a token is allowed exactly when the text with its bytes can still match, and the
    end-of-turn token exactly when the text matches whole."""
    pattern = rb"([0-9]{1,3}(\.[0-9]{1,2})? (apples|pears))|none"  # ASCII digits: Rust's \d is Unicode
    compiled = grammars.compile(ConstraintSpec("regex", pattern.decode()))
    tokenizer = grammars.tokenizer
    vocab = tokenizer.vocab_size
    token_bytes = [tokenizer.decode_bytes([t]) for t in range(vocab)]
    ordinary = np.asarray([bool(b) and not tokenizer.is_special_token(t) for t, b in enumerate(token_bytes)])
    masks = RowMasks(vocab, [EOS])
    state = compiled.start()
    text = b""
    for token in tokenizer.tokenize_str("12.5 pears"):
        allowed = masks.compute([state])[0] == 0
        expected = np.asarray([ordinary[t] and regex.fullmatch(pattern, text + token_bytes[t], partial=True)
                               is not None for t in range(vocab)])
        assert np.array_equal(allowed & ordinary, expected)
        assert allowed[EOS] == (regex.fullmatch(pattern, text) is not None)
        assert allowed[token]
        state.consume(token)
        text += token_bytes[token]
    assert text == b"12.5 pears" and state.stopped  # nothing can follow "pears"
    assert np.flatnonzero(masks.compute([state])[0] == 0).tolist() == [EOS]


def test_a_model_vocabulary_beyond_the_tokenizers_is_masked(grammars: Grammars) -> None:
    compiled = grammars.compile(ConstraintSpec("regex", r"[a-z]+"))
    vocab = grammars.tokenizer.vocab_size
    masks = RowMasks(vocab + 64, [EOS]).compute([compiled.start(), compiled.start()])
    assert masks.shape == (2, vocab + 64) and masks.dtype == np.float32
    assert set(np.unique(masks).tolist()) == {0.0, float(MASKED)}
    allowed = masks == 0
    assert not allowed[:, vocab:].any() and allowed[:, :vocab].sum(axis=1).min() > 100


def test_compiled_constraints_are_cached_by_text_and_evicted_least_recently_used(grammars: Grammars) -> None:
    small = Grammars(grammars.tokenizer, cache_size=2)
    a, b, c = (ConstraintSpec("regex", r) for r in ("a+", "b+", "c+"))
    first = small.compile(a)
    assert small.compile(a) is first and small.cached(a) is first
    small.compile(b)
    small.compile(a)  # a is now the most recent: c evicts b
    small.compile(c)
    assert small.cached(a) is first and small.cached(b) is None and small.cached(c) is not None
    assert first.start().matcher is not first.start().matcher  # each sequence its own matcher


@pytest.mark.parametrize(("kind", "text", "says"), [
    ("json_schema", "{not json", "json"),
    ("json_schema", "[1, 2]", "object"),
    ("json_schema", '{"type": "foo"}', "foo"),
    ("json_schema", '{"not": {"type": "string"}}', "not"),
    ("json_schema", '{"$ref": "#/$defs/missing"}', "missing"),
    ("regex", "a(", "unclosed"),
    ("lark_grammar", "start: undefined_rule", "undefined_rule"),
    ("lark_grammar", "", "empty"),
])
def test_a_constraint_that_cannot_compile_is_invalid_naming_its_field(grammars: Grammars, kind: str, text: str,
                                                                      says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        grammars.compile(ConstraintSpec(kind, text))
    assert caught.value.field == f"constraint.{kind}"
    assert says in caught.value.problem.lower()


def test_an_oversized_constraint_is_refused_before_compiling(grammars: Grammars) -> None:
    schema = json.dumps({"enum": [f"value-{i:06d}" for i in range(MAX_CONSTRAINT_BYTES // 10)]})
    with pytest.raises(InvalidArgument) as caught:
        grammars.compile(ConstraintSpec("json_schema", schema))
    assert caught.value.field == "constraint.json_schema" and "64 KiB" in caught.value.problem


def test_the_masked_sampler_draws_only_allowed_tokens_and_reports_the_renormalized_distribution() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, 1000).astype(np.float32)
    allowed = np.zeros(1000, dtype=bool)
    allowed[[3, 77, 500, 999]] = True
    mask = np.where(allowed, np.float32(0), MASKED)
    greedy = Sampler(SamplingConfig(), [1, 2], top_logprobs=6).sample(logits, mask)
    assert greedy.token_id == int(np.flatnonzero(allowed)[np.argmax(logits[allowed])])
    assert [t for t, _ in greedy.top] == sorted(np.flatnonzero(allowed).tolist(), key=lambda t: -logits[t])
    assert sum(np.exp(lp) for _, lp in greedy.top) == pytest.approx(1.0, abs=1e-5)  # all mass on the 4 allowed
    sampler = Sampler(SamplingConfig(temperature=1.5, top_k=50, top_p=0.9, seed=7, repetition_penalty=1.3), [3, 500])
    assert {sampler.sample(logits, mask).token_id for _ in range(200)} <= {3, 77, 500, 999}
    # A tiny temperature sends the masked scores to -inf: still never drawn, and no NaN.
    cold = Sampler(SamplingConfig(temperature=1e-3, seed=1), [], top_logprobs=3).sample(logits, mask)
    assert cold.token_id in {3, 77, 500, 999} and np.isfinite(cold.logprob)


# ---- the engine -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 11}, {"temperature": 1.0, "seed": 3,
                                                                           "top_p": 0.95, "repetition_penalty": 1.2}])
async def test_json_schema_output_parses_and_validates(engine: Engine, grammars: Grammars, chat: Any,
                                                        sampling: dict[str, Any]) -> None:
    compiled = grammars.compile(ConstraintSpec("json_schema", json.dumps(TOOL_SCHEMA)))
    sampled, finish = await drain(engine.submit(constrained(
        chat("Describe Paris as JSON with its population and two neighbouring towns."), compiled, max_tokens=160,
        **sampling)))
    assert finish.reason == Finish.STOP
    assert finish.completion_tokens == len(sampled)  # the token that completed it was sent and billed
    jsonschema.validate(json.loads(text_of(grammars, [s.token_id for s in sampled])), TOOL_SCHEMA)


async def test_constrained_and_free_rows_share_a_batch_without_changing_the_free_ones(
        engine: Engine, grammars: Grammars, chat: Any) -> None:
    prompts = [chat(q) for q in ("What is the capital of France?", "Name three colors.", "Why is the sky blue?")]
    compiled = grammars.compile(ConstraintSpec("json_schema", json.dumps(TOOL_SCHEMA)))
    alone = [[s.token_id for s in (await drain(engine.submit(constrained(p, None, max_tokens=40))))[0]]
             for p in prompts]
    mixed = await asyncio.gather(*(drain(engine.submit(constrained(p, None, max_tokens=40))) for p in prompts),
                                 *(drain(engine.submit(constrained(p, compiled, max_tokens=160, temperature=0.7,
                                                                   seed=i + 1)))
                                   for i, p in enumerate(prompts)))
    assert [[s.token_id for s in sampled] for sampled, _ in mixed[:3]] == alone
    for sampled, finish in mixed[3:]:
        assert finish.reason == Finish.STOP
        jsonschema.validate(json.loads(text_of(grammars, [s.token_id for s in sampled])), TOOL_SCHEMA)


async def test_a_seeded_constrained_generation_repeats(tiny_engine: Engine, grammars: Grammars, chat: Any) -> None:
    compiled = grammars.compile(ConstraintSpec("json_schema", json.dumps(TOOL_SCHEMA)))
    prompt = chat("Describe Lyon as JSON.")
    runs = [await drain(tiny_engine.submit(constrained(prompt, compiled, max_tokens=160, temperature=0.9, seed=42)))
            for _ in range(2)]
    assert [s.token_id for s in runs[0][0]] == [s.token_id for s in runs[1][0]]
    assert [s.logprob for s in runs[0][0]] == [s.logprob for s in runs[1][0]]


async def test_a_constrained_request_reuses_the_prefix_cache_and_stays_valid(engine: Engine, grammars: Grammars,
                                                                            chat: Any) -> None:
    compiled = grammars.compile(ConstraintSpec("json_schema", json.dumps(TOOL_SCHEMA)))
    prompt = chat("Describe Marseille as JSON, with a long list of its neighbours.")
    first, again = [await drain(engine.submit(constrained(prompt, compiled, max_tokens=160))) for _ in range(2)]
    assert first[1].cached_prompt_tokens == 0 < again[1].cached_prompt_tokens
    for sampled, finish in (first, again):
        assert finish.reason == Finish.STOP
        jsonschema.validate(json.loads(text_of(grammars, [s.token_id for s in sampled])), TOOL_SCHEMA)


async def test_a_regex_constraint_and_its_masked_top_logprobs(engine: Engine, grammars: Grammars, chat: Any) -> None:
    answers = ("yes", "no", "maybe")
    compiled = grammars.compile(ConstraintSpec("regex", "yes|no|maybe"))
    sampled, finish = await drain(engine.submit(constrained(chat("Is Paris in France? Answer yes or no."), compiled,
                                                            top_logprobs=20)))
    assert finish.reason == Finish.STOP and text_of(grammars, [s.token_id for s in sampled]) in answers
    first = sampled[0]
    # Only tokens that begin an answer are listed (fewer than the 20 asked for): they hold the whole mass.
    assert 3 <= len(first.top) < 20
    assert all(any(a.startswith(text_of(grammars, [t])) for a in answers) for t, _ in first.top)
    assert first.top[0] == (first.token_id, pytest.approx(first.logprob))
    assert sum(np.exp(lp) for _, lp in first.top) == pytest.approx(1.0, abs=1e-3)


async def test_a_lark_constraint(engine: Engine, grammars: Grammars, chat: Any) -> None:
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,4}/'
    compiled = grammars.compile(ConstraintSpec("lark_grammar", lark))
    sampled, finish = await drain(engine.submit(constrained(chat("How much is 12 times 12?"), compiled,
                                                            temperature=0.5, seed=9)))
    assert finish.reason == Finish.STOP
    assert regex.fullmatch(r"The answer is [0-9]{1,4}\.", text_of(grammars, [s.token_id for s in sampled]))


async def test_max_tokens_cuts_a_constrained_output_to_a_valid_prefix(engine: Engine, grammars: Grammars,
                                                                      chat: Any) -> None:
    compiled = grammars.compile(ConstraintSpec("json_schema", json.dumps(TOOL_SCHEMA)))
    sampled, finish = await drain(engine.submit(constrained(chat("Describe Paris as JSON."), compiled, max_tokens=6)))
    assert finish.reason == Finish.LENGTH and len(sampled) == 6
    state = compiled.start()
    for s in sampled:
        state.consume(s.token_id)
    assert not state.matcher.is_error() and not state.matcher.is_accepting()
    assert text_of(grammars, [s.token_id for s in sampled]).startswith("{")


# Hypothesis: small JSON Schemas of the kinds tool calls use, nested at most twice.
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
LEAVES = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 5000)),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 100}, st.integers(-100, 100)),
    st.just({"type": "boolean"}),
    st.builds(lambda values: {"enum": values}, st.lists(NAMES, min_size=1, max_size=4, unique=True)),
)


def _object(properties: dict[str, dict[str, Any]], required: list[bool]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": [name for name, keep in zip(properties, required, strict=False) if keep]}


VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda items, most: {"type": "array", "items": items, "maxItems": most}, inner, st.integers(0, 3)),
        st.dictionaries(NAMES, inner, min_size=1, max_size=3).flatmap(
            lambda props: st.builds(_object, st.just(props), st.lists(st.booleans(), min_size=len(props),
                                                                      max_size=len(props)))),
    ),
    max_leaves=4,
)
# A tool call's arguments: an object at the top.
SCHEMAS = st.dictionaries(NAMES, VALUES, min_size=1, max_size=3).flatmap(
    lambda props: st.builds(_object, st.just(props), st.lists(st.booleans(), min_size=len(props),
                                                              max_size=len(props))))


@settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(1, 2**31))
async def test_generated_schemas_give_valid_json_or_a_valid_prefix(tiny_engine: Engine, grammars: Grammars,
                                                                  chat: Any, schema: dict[str, Any], seed: int) -> None:
    """Whatever the model would say, the constraint lets through only JSON the schema accepts, or a prefix of it when
    max_tokens cuts it: the tiny random model's choices are as arbitrary as that needs."""
    compact = {**schema, "x-guidance": {"whitespace_flexible": False}}  # bounded output: no runs of whitespace
    compiled = grammars.compile(ConstraintSpec("json_schema", json.dumps(compact)))
    sampled, finish = await drain(tiny_engine.submit(constrained(
        chat(f"Answer with JSON matching this schema: {json.dumps(schema)}"), compiled, max_tokens=100,
        temperature=0.8, seed=seed)))
    tokens = [s.token_id for s in sampled]
    event(f"finished {finish.reason.value}")
    if finish.reason == Finish.STOP:
        jsonschema.validate(json.loads(text_of(grammars, tokens)), schema)
    else:
        assert finish.reason == Finish.LENGTH and len(tokens) == 100
        state = compiled.start()
        for token in tokens:
            state.consume(token)
        assert not state.matcher.is_error()


# ---- over gRPC ----------------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving(model: ServedModel) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    """The inference servicer behind the shared interceptor, in process on a free port."""
    tracer = TracerProvider().get_tracer("test")
    metrics = InferenceMetrics(MeterProvider().get_meter("test"), lambda: {})
    server = grpc.aio.server(interceptors=[ServerInterceptor("inference", tracer)], options=SERVER_OPTIONS)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer({model.id: model}, tracer, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield inference_pb2_grpc.InferenceStub(channel)
    finally:
        await server.stop(None)


def _start(prompt: list[int], constraint: generation_pb2.OutputConstraint,
           max_tokens: int = 160) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
        model=MODEL, prompt_token_ids=prompt, max_tokens=max_tokens, constraint=constraint))


async def _refused(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest,
                   ) -> grpc.aio.AioRpcError:
    call = stub.Generate(timeout=30)
    await call.write(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_rest(call)
    return caught.value


async def test_over_grpc_a_schema_constrains_and_bad_constraints_are_invalid_with_their_field(
        engine: Engine, grammars: Grammars, chat: Any) -> None:
    prompt = chat("Describe Rome as JSON.")
    model = ServedModel("smollm2-135m-instruct", "1", engine, engine.model.vocab_size, 8192, grammars)
    async with serving(model) as stub:
        call = stub.Generate(timeout=60)
        await call.write(_start(prompt, generation_pb2.OutputConstraint(json_schema=json.dumps(TOOL_SCHEMA))))
        responses = await read_rest(call)
        tokens = [t.token_id for r in responses if r.HasField("tokens") for t in r.tokens.tokens]
        assert responses[-1].finish.reason == generation_pb2.FINISH_REASON_STOP
        assert responses[-1].finish.usage.completion_tokens == len(tokens)
        jsonschema.validate(json.loads(text_of(grammars, tokens)), TOOL_SCHEMA)
        for constraint, field in [(generation_pb2.OutputConstraint(json_schema='{"type": 3}'), "json_schema"),
                                  (generation_pb2.OutputConstraint(json_schema=""), "json_schema"),
                                  (generation_pb2.OutputConstraint(regex="(unclosed"), "regex"),
                                  (generation_pb2.OutputConstraint(lark_grammar="start: nope"), "lark_grammar"),
                                  (generation_pb2.OutputConstraint(regex="x" * (MAX_CONSTRAINT_BYTES + 1)), "regex")]:
            error = await _refused(stub, _start(prompt, constraint))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (error.details() or "").startswith(f"constraint.{field}: ")
            assert typed_details(error)["BadRequest"].field_violations[0].field == f"constraint.{field}"


async def test_over_grpc_a_model_without_a_tokenizer_refuses_a_constraint_but_serves_free_text(
        engine: Engine, chat: Any) -> None:
    model = ServedModel("smollm2-135m-instruct", "1", engine, engine.model.vocab_size, 8192, grammars=None)
    async with serving(model) as stub:
        error = await _refused(stub, _start(chat("Hi"), generation_pb2.OutputConstraint(regex="yes|no")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "tokenizer" in (error.details() or "")
        call = stub.Generate(timeout=60)
        await call.write(_start(chat("Hi"), generation_pb2.OutputConstraint(), max_tokens=8))  # set, empty: free
        responses = await read_rest(call)
        assert responses[-1].finish.usage.completion_tokens > 0


# ---- the loader -----------------------------------------------------------------------------------------------------

async def test_the_loader_builds_grammars_from_the_versions_tokenizer_artifact(built_model: Path,
                                                                              tmp_path: Path) -> None:
    """The tokenizer artifact comes through the same digest-addressed cache as the weights (pre-filled here, so the
    registry is never asked); no tokenizer artifact, or one llguidance cannot read, serves the version unconstrained."""
    import hashlib

    from lmesh.registry.v1 import registry_pb2

    from services.inference.loader import _grammars

    def version_with(content: bytes | None) -> registry_pb2.ModelVersion:
        version = registry_pb2.ModelVersion(name="smollm2-135m-instruct", version="1", eos_token_ids=[EOS])
        if content is not None:
            sha = hashlib.sha256(content).hexdigest()
            (tmp_path / sha).write_bytes(content)
            version.artifacts.append(registry_pb2.Artifact(kind=registry_pb2.ARTIFACT_KIND_TOKENIZER, sha256=sha))
        return version

    registry: Any = None  # every artifact is in the cache: fetch_to_cache never calls it
    cache = GrammarCache()
    grammars = await _grammars(registry, version_with((built_model / "tokenizer.json").read_bytes()), tmp_path,
                               cache)
    assert grammars is not None and grammars.tokenizer.vocab_size == 49152 and grammars.tokenizer.eos_tokens == [EOS]
    assert grammars.compile(ConstraintSpec("regex", "yes|no")).start().matcher.is_accepting() is False
    assert await _grammars(registry, version_with(None), tmp_path, cache) is None
    assert await _grammars(registry, version_with(b'{"not": "a tokenizer"}'), tmp_path, cache) is None


async def test_versions_sharing_a_tokenizer_share_one_constraint_compiler(built_model: Path) -> None:
    """llguidance reads a tokenizer holding the GIL (half a second here): a replica swapping between builds of one
    model reads it once; other end-of-turn tokens get their own; the least recently used goes beyond the bound."""
    cache, path = GrammarCache(size=2), built_model / "tokenizer.json"
    first = await cache.get("tokenizer-a", [EOS], path, "m:1")
    assert first is not None and await cache.get("tokenizer-a", [EOS], path, "m:1-int8") is first
    other_eos = await cache.get("tokenizer-a", [EOS, 0], path, "m:2")
    assert other_eos is not first
    await cache.get("tokenizer-b", [EOS], path, "n:1")  # a third: m:1's goes
    assert await cache.get("tokenizer-a", [EOS, 0], path, "m:2") is other_eos
    assert await cache.get("tokenizer-a", [EOS], path, "m:1") is not first

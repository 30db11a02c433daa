"""The gateway's response cache without a mesh: key derivation, the bounded LRU, the stored answer's encoding, replay
and recording, a Redis that is down or silent, and the hook in the request path through the HTTP door (with the
FakeChat of test_openai_http). The real mesh, both protocols and a shared Redis: test_response_cache_mesh.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from lmesh.common.v1 import generation_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.gateway.accounting import Meter
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams
from services.gateway.logprobs import Candidate, TokenLogprob
from services.gateway.response_cache import (
    BYPASS,
    CacheLimits,
    MemoryStore,
    Recorder,
    RedisStore,
    ResponseCache,
    StoredAnswer,
    StoredDelta,
    cache_control,
    replay,
    response_key,
)
from tests.test_openai_http import ANSWER, USER, Served, post, serve
from tests.test_telemetry import hung_collector

__all__ = ["hung_collector"]  # a fixture of test_telemetry's, used here

PARAMS = ChatParams(model="tiny:1", messages=[("user", "What is the capital of France?")], max_tokens=16,
                    temperature=0.0, top_p=0.0, top_k=0, seed=0, repetition_penalty=0.0, stop=[])
PROMPT = [1, 2, 3, 4]


def key(tenant: str = "acme", model_id: str = "tiny:1", prompt: list[int] | None = None, **changes: Any) -> str:
    return response_key(tenant, model_id, PROMPT if prompt is None else prompt, replace(PARAMS, **changes))


# ---- keys --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"max_tokens": 17}, {"temperature": 0.5}, {"top_p": 0.9}, {"top_k": 40}, {"seed": 7}, {"stop": ["."]},
    {"repetition_penalty": 1.1}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 2},
    {"messages": [("user", "What is the capital of Italy?")]},
    {"messages": [("system", "What is the capital of France?")]},
], ids=lambda changes: ",".join(changes))
def test_any_generation_field_or_message_changes_the_key(changes: dict[str, Any]) -> None:
    assert key(**changes) != key()


def test_the_key_is_a_hash_of_tenant_version_and_prompt_that_repeats_for_the_same_request() -> None:
    assert key() == key() and len(key()) == 64 and int(key(), 16) >= 0
    assert key(tenant="globex") != key()
    assert key(model_id="tiny:2") != key()
    assert key(prompt=[1, 2, 3, 5]) != key() and key(prompt=[1, 2, 3, 4, 0]) != key()
    # What only routes or labels the request is not part of it.
    assert key(session="someone", model="default") == key()
    assert "acme" not in key() and "France" not in key()


def test_only_a_deterministic_request_that_did_not_opt_out_is_planned() -> None:
    cache = ResponseCache()
    planned = cache.plan(PARAMS, "acme", "tiny:1", PROMPT)
    assert (planned.key, planned.read, planned.write) == (key(), True, True)
    seeded = cache.plan(replace(PARAMS, temperature=0.8, seed=42), "acme", "tiny:1", PROMPT)
    assert seeded.key is not None and seeded.key != planned.key
    assert cache.plan(replace(PARAMS, temperature=0.8), "acme", "tiny:1", PROMPT) is BYPASS  # sampled, no seed
    assert cache.plan(replace(PARAMS, cache_read=False, cache_store=False), "acme", "tiny:1", PROMPT) is BYPASS
    store_only = cache.plan(replace(PARAMS, cache_read=False), "acme", "tiny:1", PROMPT)
    assert (store_only.read, store_only.write, store_only.result_if_missed) == (False, True, "bypass")
    assert ResponseCache.off().plan(PARAMS, "acme", "tiny:1", PROMPT) is BYPASS


@pytest.mark.parametrize(("header", "expected"), [
    ("", (True, True)), ("no-cache", (False, True)), ("no-store", (True, False)),
    ("No-Cache, NO-STORE", (False, False)), ("max-age=0, no-cache", (False, True)), ("private", (True, True)),
])
def test_cache_control_decides_reading_and_storing(header: str, expected: tuple[bool, bool]) -> None:
    assert cache_control(header) == expected


# ---- the bounded LRU ------------------------------------------------------------------------------------------

class LruMachine(RuleBasedStateMachine):
    """MemoryStore against a plain model of an LRU bounded by entries and bytes, with a TTL."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.limits = CacheLimits(max_entries=4, max_bytes=800, ttl_s=10.0)
        self.store = MemoryStore(self.limits, clock=lambda: self.now)
        self.model: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    @rule(name=st.sampled_from("abcdefg"), size=st.integers(0, 160))
    def put(self, name: str, size: int) -> None:
        value = name.encode() * size
        kept = self.store.put(name, value)
        assert kept == (len(value) <= self.limits.max_bytes // 8)
        if kept:
            self.model.pop(name, None)
            self.model[name] = (self.now + self.limits.ttl_s, value)
            while len(self.model) > self.limits.max_entries or sum(len(v) for _, v in self.model.values()) > 800:
                self.model.popitem(last=False)

    @rule(name=st.sampled_from("abcdefg"))
    def get(self, name: str) -> None:
        expected = self.model.get(name)
        if expected is not None and self.now >= expected[0]:
            del self.model[name]
            expected = None
        if expected is not None:
            self.model.move_to_end(name)
        assert self.store.get(name) == (expected[1] if expected else None)

    @rule(seconds=st.floats(0, 6))
    def wait(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: bool(self.model))
    @rule()
    def newest_put_is_there(self) -> None:
        name = next(reversed(self.model))
        if self.now < self.model[name][0]:
            assert self.store.get(name) == self.model[name][1]
            self.model.move_to_end(name)

    @invariant()
    def within_bounds(self) -> None:
        assert len(self.store) <= self.limits.max_entries
        assert 0 <= self.store.bytes <= self.limits.max_bytes


TestLru = LruMachine.TestCase
TestLru.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ---- what is stored ------------------------------------------------------------------------------------------

candidates = st.builds(Candidate, st.integers(0, 50_000), st.binary(max_size=8),
                       st.floats(allow_nan=False, max_value=0.0))
entries = st.lists(st.builds(TokenLogprob, candidates, st.lists(candidates, max_size=3).map(tuple)), max_size=3)
answers = st.builds(
    StoredAnswer,
    st.lists(st.builds(StoredDelta, st.text(max_size=12), entries.map(tuple), st.integers(0, 100)), max_size=6)
    .map(tuple),
    st.sampled_from([generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH]),
    st.builds(generation_pb2.Usage, prompt_tokens=st.integers(0, 8192), completion_tokens=st.integers(0, 8192),
              total_tokens=st.integers(0, 16384), cached_prompt_tokens=st.integers(0, 8192)),
    entries.map(tuple))


@given(answers)
@settings(max_examples=80, deadline=None)
def test_an_answer_decodes_to_what_was_encoded(answer: StoredAnswer) -> None:
    assert StoredAnswer.decode(answer.encode()) == answer


@pytest.mark.parametrize("data", [b"", b"{}", b"not json", json.dumps({"v": 99}).encode(), b"\xff\xfe"])
def test_a_value_that_is_not_a_stored_answer_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        StoredAnswer.decode(data)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


@given(json_values, st.sampled_from(["v", "finish", "usage", "deltas", "end"]))
@settings(max_examples=150, deadline=None)
def test_whatever_a_shared_store_holds_decodes_or_is_refused_with_value_error(junk: Any, field: str) -> None:
    """A Redis value another version (or anyone) wrote: a miss, never a failed chat."""
    value = json.loads(STORED.encode())
    value[field] = junk
    with contextlib.suppress(ValueError):
        StoredAnswer.decode(json.dumps(value).encode())


def usage(prompt: int, completion: int, cached: int = 0) -> generation_pb2.Usage:
    return generation_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                                cached_prompt_tokens=cached)


ENTRY = TokenLogprob(Candidate(5, b"Par", -0.5), (Candidate(6, b"Lon", -2.0),))
STORED = StoredAnswer((StoredDelta("Paris", (ENTRY,), 2), StoredDelta(" is", (), 3), StoredDelta(" nice.", (), 5)),
                      generation_pb2.FINISH_REASON_STOP, usage(9, 6, cached=4), (ENTRY,))


async def test_a_replay_gives_the_same_events_marks_usage_and_feeds_the_meter() -> None:
    meter = Meter()
    events = [e async for e in replay(STORED, meter, asyncio.Event())]
    assert [(e.text, e.logprobs) for e in events if isinstance(e, ChatDelta)] == [
        ("Paris", [ENTRY]), (" is", []), (" nice.", [])]
    end = events[-1]
    assert isinstance(end, ChatEnd) and end.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert end.logprobs == [ENTRY] and end.usage.cached_response
    assert (end.usage.prompt_tokens, end.usage.completion_tokens, end.usage.cached_prompt_tokens) == (9, 6, 4)
    assert not STORED.usage.cached_response  # the stored answer itself is left as it was
    # Settled as a generation would be: the usage the answer reports.
    assert (meter.prompt_tokens, meter.completion_tokens) == (9, 6)


async def test_a_cancelled_replay_ends_cancelled_and_is_charged_what_it_replayed() -> None:
    meter, cancel = Meter(), asyncio.Event()
    events = []
    async for event in replay(STORED, meter, cancel):
        events.append(event)
        if len(events) == 2:
            cancel.set()
    end = events[-1]
    assert [type(e) for e in events] == [ChatDelta, ChatDelta, ChatEnd]
    assert isinstance(end, ChatEnd) and end.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    assert (end.usage.completion_tokens, meter.completion_tokens, meter.prompt_tokens) == (3, 3, 9)


async def generated(reason: generation_pb2.FinishReason.ValueType, meter: Meter) -> AsyncIterator[ChatDelta | ChatEnd]:
    for text, tokens in (("Paris", 2), (" is", 3), (" nice.", 5)):
        meter.received(tokens - meter.completion_tokens)
        yield ChatDelta(text, [ENTRY] if text == "Paris" else [])
    yield ChatEnd(reason, usage(9, 6, cached=4), [ENTRY])


@pytest.mark.parametrize("reason", [generation_pb2.FINISH_REASON_CANCELLED,
                                    generation_pb2.FINISH_REASON_CONTENT_FILTER])
async def test_only_a_complete_answer_is_recorded(reason: generation_pb2.FinishReason.ValueType) -> None:
    meter = Meter()
    recorder = Recorder(meter)
    assert len([e async for e in recorder.record(generated(reason, meter))]) == 4
    assert recorder.answer is None
    stopped = Recorder(meter := Meter())
    [e async for e in stopped.record(generated(generation_pb2.FINISH_REASON_STOP, meter))]
    assert stopped.answer == STORED  # its chunks, with the tokens produced by each


async def test_an_answer_cut_before_its_end_is_not_recorded_and_its_generation_is_closed() -> None:
    meter, closed = Meter(), asyncio.Event()

    async def endless() -> AsyncIterator[ChatDelta | ChatEnd]:
        try:
            while True:
                yield ChatDelta("x")
        finally:
            closed.set()

    recorder = Recorder(meter)
    recording = recorder.record(endless())
    assert isinstance(await anext(recording), ChatDelta)
    await recording.aclose()  # type: ignore[attr-defined]
    assert closed.is_set() and recorder.answer is None


async def test_the_cache_stores_only_complete_answers_for_plans_that_write() -> None:
    cache = ResponseCache()
    plan = cache.plan(PARAMS, "acme", "tiny:1", PROMPT)
    cut = replace(STORED, finish_reason=generation_pb2.FINISH_REASON_CANCELLED)
    cache.store(plan, cut)
    assert await cache.lookup(plan) is None
    cache.store(replace(plan, write=False), STORED)
    assert await cache.lookup(plan) is None
    cache.store(plan, STORED)
    assert await cache.lookup(plan) == STORED
    assert await cache.lookup(replace(plan, read=False)) is None
    assert await cache.lookup(cache.plan(PARAMS, "globex", "tiny:1", PROMPT)) is None  # another tenant


# ---- a Redis that fails ---------------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("kind", ["down", "silent"])
async def test_a_redis_that_is_down_or_silent_is_a_miss_and_is_then_skipped(kind: str, hung_collector: int) -> None:
    port = closed_port() if kind == "down" else hung_collector  # a port that accepts and never answers
    cache = ResponseCache(shared=RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2))
    plan = cache.plan(PARAMS, "acme", "tiny:1", PROMPT)
    try:
        began = time.monotonic()
        assert await cache.lookup(plan) is None  # a miss, not an error
        first = time.monotonic() - began
        began = time.monotonic()
        assert await cache.lookup(plan) is None
        second = time.monotonic() - began
        cache.store(plan, STORED)  # memory keeps it; the Redis store is skipped
        assert await cache.lookup(plan) == STORED
    finally:
        await cache.close()
    assert first < 5.0  # bounded by the timeout (0.2 s), with room for a loaded machine
    if kind == "silent":
        assert second < first / 2  # skipped: no second wait on a Redis that just timed out


# ---- the hook in the request path (HTTP door, FakeChat) -------------------------------------------------------

@pytest.fixture
async def cached() -> AsyncIterator[tuple[Served, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    async with serve() as served:
        served.chat.response_cache = ResponseCache(meter=MeterProvider(metric_readers=[reader]).get_meter("test"))
        yield served, reader


def without_ids(body: bytes) -> bytes:
    """An answer with its per-request fields (id, created, lmesh's usage extension) blanked."""
    text = body.decode()
    for line in text.splitlines():
        if line.startswith("data: {"):
            text = text.replace(line, "data: " + json.dumps(blank(json.loads(line.removeprefix("data: ")))))
    if text.startswith("{"):
        text = json.dumps(blank(json.loads(text)))
    return text.encode()


def blank(answer: dict[str, Any]) -> dict[str, Any]:
    answer = {**answer, "id": "", "created": 0}
    if answer.get("usage"):
        answer["usage"] = {**answer["usage"], "lmesh": None}
    return answer


def lookups(reader: InMemoryMetricReader) -> dict[str, float]:
    data = reader.get_metrics_data()
    counted: dict[str, float] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "lmesh.gateway.response_cache.lookups":
                    for point in metric.data.data_points:
                        counted[str(point.attributes["lmesh.response_cache"])] = point.value  # type: ignore[index,union-attr]
    return counted


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_identical_request_is_answered_from_the_cache_with_the_same_bytes(
        cached: tuple[Served, InMemoryMetricReader], stream: bool) -> None:
    served, reader = cached
    body = {"model": "default", "messages": USER, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    first = await post(served, "/v1/chat/completions", body)
    second = await post(served, "/v1/chat/completions", body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["x-lmesh-cache"], second.headers["x-lmesh-cache"]) == ("miss", "hit")
    assert served.chat.generations == 1  # the second never reached the model
    assert len(served.chat.seen) == 2  # ... but was authorized, screened and reserved (prepare) like the first
    assert without_ids(second.content) == without_ids(first.content)
    assert first.content != second.content  # its own id
    usages = [json.loads(line.removeprefix("data: "))["usage"] for line in second.text.splitlines()
              if line.startswith('data: {"id"') and '"choices":[]' in line] if stream else [second.json()["usage"]]
    assert usages[-1]["lmesh"] == {"cached_response": True} and usages[-1]["completion_tokens"] == len(ANSWER)
    # The hit is settled with the usage it reports; the span and the metric say what happened.
    assert [m.completion_tokens for m in served.chat.accounts.settled.values()][-2:] == [len(ANSWER)] * 2
    results = [(s.attributes or {}).get("lmesh.response_cache") for s in served.spans.get_finished_spans()
               if s.name.startswith("lmesh.gateway/POST")][-2:]
    assert results == ["miss", "hit"]
    assert lookups(reader) == {"miss": 1, "hit": 1}


async def test_cache_control_and_sampling_bypass_the_cache(cached: tuple[Served, InMemoryMetricReader]) -> None:
    served, reader = cached

    async def ask(headers: dict[str, str] | None = None, **fields: Any) -> str:
        body = {"model": "default", "messages": USER, "temperature": 0, **fields}  # OpenAI's default samples
        response = await post(served, "/v1/chat/completions", body, headers=headers)
        assert response.status_code == 200, response.text
        return str(response.headers["x-lmesh-cache"])

    assert await ask({"Cache-Control": "no-store"}) == "miss"  # looked up, not stored
    assert await ask() == "miss"  # ... so this one runs the model, and stores its answer
    assert await ask({"Cache-Control": "no-cache"}) == "bypass"  # not read (it runs the model)
    assert await ask() == "hit"
    assert await ask(temperature=0.7) == "bypass"  # sampled without a seed: never cached
    assert await ask(temperature=0.7, seed=3) == "miss"
    assert await ask(temperature=0.7, seed=3) == "hit"
    assert await ask(max_tokens=3) == "miss"
    assert served.chat.generations == 6
    assert lookups(reader) == {"miss": 4, "bypass": 2, "hit": 2}


async def test_a_failed_answer_is_not_stored(cached: tuple[Served, InMemoryMetricReader]) -> None:
    served, _ = cached
    late = {"model": "late", "messages": USER}  # fails after its first delta
    assert (await post(served, "/v1/chat/completions", late)).status_code == 503
    assert (await post(served, "/v1/chat/completions", late)).status_code == 503
    assert served.chat.generations == 2


class BlockingAtTheEnd:
    """Output screening that, while `block`, turns an answer's end into CONTENT_FILTER (a rule matched late)."""

    def __init__(self) -> None:
        self.block = True
        self.screened = 0

    async def screen_output(self, screening: object, events: AsyncIterator[ChatDelta | ChatEnd], cancel: object,
                            logprobs: bool = False) -> AsyncIterator[ChatDelta | ChatEnd]:
        self.screened += 1
        async for event in events:
            if isinstance(event, ChatEnd) and self.block:
                yield ChatEnd(generation_pb2.FINISH_REASON_CONTENT_FILTER, event.usage)
                return
            yield event


async def test_output_screening_runs_on_hits_and_a_filtered_answer_is_not_stored(
        cached: tuple[Served, InMemoryMetricReader]) -> None:
    served, _ = cached
    screen = BlockingAtTheEnd()
    served.chat.guardrails = screen  # type: ignore[assignment]

    async def ask() -> tuple[str, str]:
        response = await post(served, "/v1/chat/completions", {"model": "default", "messages": USER,
                                                               "temperature": 0})
        assert response.status_code == 200, response.text
        return response.headers["x-lmesh-cache"], response.json()["choices"][0]["finish_reason"]

    assert await ask() == ("miss", "content_filter")
    assert await ask() == ("miss", "content_filter")  # the model said STOP, but screening filtered it: not kept
    screen.block = False
    assert await ask() == ("miss", "stop")
    assert await ask() == ("hit", "stop")
    screen.block = True  # the rules in force when a hit is served apply to it
    assert await ask() == ("hit", "content_filter")
    assert (served.chat.generations, screen.screened) == (3, 5)

"""The gateway's domain without the mesh: validation, stop strings, and per-token logprobs riding on messages."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2
from lmesh.tokenizer.v1 import tokenizer_pb2

from services.common.errors import InvalidArgument, Unavailable
from services.common.rpc import first_message
from services.gateway.chat import ChatParams, validate
from services.gateway.logprobs import AnswerAssembler, TokenLogprob, Vocabulary, VocabularyCache
from services.gateway.stops import StopMatcher
from services.tokenizer.text import IncrementalDetokenizer, ModelTokenizer
from tests.test_tokenizer import IM_END, IM_START, SAMPLE_TEXTS, train_small_tokenizer

PARAMS = ChatParams(model="default", messages=[("user", "hi")], max_tokens=8, temperature=0.0, top_p=0.0,
                    top_k=0, seed=0, repetition_penalty=0.0, stop=[])


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("logprobs, top_logprobs", [(False, 0), (True, 0), (True, 1), (True, 20)])
def test_logprob_fields_in_range_are_valid(logprobs: bool, top_logprobs: int) -> None:
    validate(replace(PARAMS, logprobs=logprobs, top_logprobs=top_logprobs))


@pytest.mark.parametrize("logprobs, top_logprobs", [(True, 21), (True, -1), (False, 3), (False, 21)])
def test_bad_top_logprobs_is_invalid_argument_naming_it(logprobs: bool, top_logprobs: int) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(replace(PARAMS, logprobs=logprobs, top_logprobs=top_logprobs))
    assert err.value.field == "top_logprobs"


# ---------------------------------------------------------------------------------------- stop strings


def feed_all(stops: list[str], deltas: Sequence[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    text = "".join(matcher.feed(d) for d in deltas) + matcher.flush()
    return text, matcher.stopped


def test_stop_string_ends_the_text_at_the_first_complete_stop() -> None:
    assert feed_all(["Paris"], ["The capital is Par", "is, a city"]) == ("The capital is ", True)
    assert feed_all(["Paris"], ["Par", "k"]) == ("Park", False)
    # "bc" is complete before "abcd" is: the answer stops there, however the text was split.
    assert feed_all(["abcd", "bc"], ["xabcd"]) == ("xa", True)
    assert feed_all(["abcd", "bc"], list("xabcd")) == ("xa", True)


@pytest.mark.parametrize("seed", range(10))
def test_stop_strings_do_not_depend_on_how_the_text_is_split(seed: int) -> None:
    rng = random.Random(seed)
    text = rng.choice(SAMPLE_TEXTS)
    stops = [text[i:i + rng.randint(1, 6)] for i in (rng.randrange(len(text)) for _ in range(2))]
    whole = feed_all(stops, [text])
    cuts = sorted(rng.sample(range(1, len(text)), 5))
    assert feed_all(stops, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]) == whole
    assert feed_all(stops, list(text)) == whole


def test_stop_end_is_where_the_stop_string_ends_in_the_last_delta() -> None:
    matcher = StopMatcher(["Paris"])
    assert matcher.feed("in Pa") == "in " and matcher.held == "Pa"
    assert matcher.feed("ris!") == ""
    assert matcher.stopped and matcher.stop_end == 3


# ------------------------------------------------------------------------------------ logprobs alignment


@pytest.fixture(scope="module")
def small() -> ModelTokenizer:
    return ModelTokenizer(train_small_tokenizer(), name="small:1")


def vocabulary_of(tokenizer: ModelTokenizer) -> Vocabulary:
    vocabulary = tokenizer.vocabulary()
    return Vocabulary(vocabulary.token_bytes, frozenset(vocabulary.special_token_ids))


def chunks_of(ids: Sequence[int], rng: random.Random) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        size = rng.choice([1, 1, 1, 2, 3, 5])
        chunks.append(list(ids[i:i + size]))
        i += size
    return chunks


def stream(tokenizer: ModelTokenizer, chunks: list[list[int]], stops: list[str],
           ) -> list[tuple[str, list[TokenLogprob]]]:
    """The gateway's loop without gRPC: every message's (text, entries); the last one is the finish message."""
    answer = AnswerAssembler(stops, vocabulary_of(tokenizer))
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    messages = []
    for chunk in chunks:
        answer.add_chunk([generation_pb2.TokenLogprob(token_id=i, logprob=-0.5 - i) for i in chunk])
        text, entries = answer.piece(detokenizer.push(chunk))
        if text:
            messages.append((text, entries))
        else:
            assert not entries
    text, entries = answer.piece(detokenizer.flush(), final=True)
    if text:
        messages.append((text, entries))
    messages.append(("", answer.rest()))
    return messages


def assert_no_entry_before_its_text(tokenizer: ModelTokenizer, messages: list[tuple[str, list[TokenLogprob]]],
                                    ) -> None:
    token_end = text_end = 0
    for text, entries in messages:
        text_end += len(text.encode())
        for entry in entries:
            if entry.chosen.token_id not in tokenizer.vocabulary().special_token_ids:
                token_end += len(entry.chosen.data)
            assert token_end <= text_end or text == "", "an entry rode on a message before its text"


@pytest.mark.parametrize("seed", range(12))
def test_every_token_rides_once_in_order_never_before_its_text(small: ModelTokenizer, seed: int) -> None:
    rng = random.Random(seed)
    # A special token between two texts: skipped in the answer's text, still reported.
    ids = [*small.encode(rng.choice(SAMPLE_TEXTS)), IM_START, *small.encode(" " + rng.choice(SAMPLE_TEXTS))]
    messages = stream(small, chunks_of(ids, rng), [])
    entries = [e for _, es in messages for e in es]
    assert [e.chosen.token_id for e in entries] == ids
    assert [e.chosen.logprob for e in entries] == [-0.5 - i for i in ids]
    assert "".join(t for t, _ in messages) == small.decode(ids, skip_special_tokens=True)
    assert b"".join(e.chosen.data for e in entries) == small.decode(ids).encode()
    assert_no_entry_before_its_text(small, messages)


def test_a_partial_character_rides_with_the_message_that_completes_it(small: ModelTokenizer) -> None:
    ids = small.encode("a😀b")
    messages = stream(small, [[i] for i in ids], [])
    assert [t for t, _ in messages] == ["a", "😀", "b", ""]
    assert [len(es) for _, es in messages] == [1, len(ids) - 2, 1, 0]


def first_stop_token(tokenizer: ModelTokenizer, ids: Sequence[int], stops: list[str]) -> int:
    """How many tokens it takes, one at a time, until some stop string is complete (0: never)."""
    for count in range(1, len(ids) + 1):
        if any(stop in tokenizer.decode(ids[:count], skip_special_tokens=True) for stop in stops):
            return count
    return 0


@pytest.mark.parametrize("seed", range(12))
def test_entries_end_with_the_token_that_completed_a_stop_string(small: ModelTokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = rng.choice(SAMPLE_TEXTS)
    start = rng.randrange(len(text) // 2, len(text) - 1)
    stops = [text[start:start + rng.randint(1, 4)]]
    ids = small.encode(text)
    messages = stream(small, chunks_of(ids, rng), stops)
    count = first_stop_token(small, ids, stops)
    assert count
    assert [e.chosen.token_id for _, es in messages for e in es] == ids[:count]
    assert "".join(t for t, _ in messages) == text[:text.find(stops[0])]


def test_top_alternatives_carry_their_bytes(small: ModelTokenizer) -> None:
    hello, world = small.encode("Hello"), small.encode(" world")
    answer = AnswerAssembler([], vocabulary_of(small))
    answer.add_chunk([generation_pb2.TokenLogprob(
        token_id=hello[0], logprob=-0.1, top_logprobs=[generation_pb2.TopLogprob(token_id=hello[0], logprob=-0.1),
                                                       generation_pb2.TopLogprob(token_id=IM_END, logprob=-3.0)])])
    text, entries = answer.piece(small.decode(hello[:1]))
    assert text and [e.chosen.data for e in entries] == [small.vocabulary().token_bytes[hello[0]]]
    assert [(a.token_id, a.data, a.logprob) for a in entries[0].top] == [
        (hello[0], entries[0].chosen.data, pytest.approx(-0.1)), (IM_END, b"<|im_end|>", -3.0)]
    assert world and answer.rest() == []


def test_without_a_vocabulary_no_entries_ride(small: ModelTokenizer) -> None:
    answer = AnswerAssembler(["!"])
    answer.add_chunk([generation_pb2.TokenLogprob(token_id=5, logprob=-1.0)])
    assert answer.piece("hi") == ("hi", [])
    assert answer.piece("!x", final=True) == ("", [])
    assert answer.stopped and answer.rest() == []


# ------------------------------------------------------------------------------------- vocabulary cache


class MethodNames:
    """A stub whose methods are their names, to see which one a peer call selects."""

    def __getattr__(self, name: str) -> str:
        return name


class FakeTokenizerService:
    """Stands in for the tokenizer's peer: answers GetVocabulary when `release` is set, counting calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.failures = 0

    async def call(self, method: Any, request: Any, **_: Any) -> Any:
        assert method(MethodNames()) == "GetVocabulary"
        self.calls.append(request.model)
        await self.release.wait()
        if self.failures:
            self.failures -= 1
            raise Unavailable("lmesh-tokenizer is down")
        return tokenizer_pb2.GetVocabularyResponse(model=request.model, token_bytes=[b"a", request.model.encode()],
                                                   special_token_ids=[0])


async def test_vocabulary_is_fetched_once_for_concurrent_requests() -> None:
    service = FakeTokenizerService()
    cache = VocabularyCache(service)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(cache.get("m:1")) for _ in range(5)]
    await asyncio.sleep(0.01)
    service.release.set()
    vocabularies = await asyncio.gather(*waiting)
    assert service.calls == ["m:1"]
    assert vocabularies[0].token_bytes == [b"a", b"m:1"] and vocabularies[0].special_token_ids == {0}
    assert all(v is vocabularies[0] for v in vocabularies)
    assert await cache.get("m:1") is vocabularies[0] and service.calls == ["m:1"]


async def test_vocabulary_fetch_failure_is_retried_by_the_next_request() -> None:
    service = FakeTokenizerService()
    service.release.set()
    service.failures = 1
    cache = VocabularyCache(service)  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        await cache.get("m:1")
    assert (await cache.get("m:1")).bytes_of(1) == b"m:1"
    assert service.calls == ["m:1", "m:1"]


async def test_vocabulary_cache_keeps_a_few_versions() -> None:
    service = FakeTokenizerService()
    service.release.set()
    cache = VocabularyCache(service, max_models=2)  # type: ignore[arg-type]
    for model in ("a:1", "b:1", "a:1", "c:1", "a:1", "b:1"):
        await cache.get(model)
    # a:1 stayed (recently used); b:1 was the least recently used when c:1 came, so it is fetched again.
    assert service.calls == ["a:1", "b:1", "c:1", "b:1"]


async def test_a_stream_left_idle_before_its_first_message_is_refused_naming_the_field() -> None:
    async def idle() -> AsyncIterator[gateway_pb2.ChatRequest]:
        await asyncio.Event().wait()  # a client that opened the stream and never wrote
        yield gateway_pb2.ChatRequest()

    with pytest.raises(InvalidArgument) as refused:
        await first_message(idle(), "start", timeout_s=0.05)
    assert refused.value.message == "start: no start message within 0.05 s of opening the stream"

    async def prompt() -> AsyncIterator[gateway_pb2.ChatRequest]:
        yield gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(max_tokens=3))

    assert (await first_message(prompt(), "start", timeout_s=0.05)).max_tokens == 3

"""The inference engine on the real model: batching, determinism, admission, deadlines, cancel, sampling. What holds
whatever the weights (rows moving, the device route, prefix reuse, seeding) runs on a tiny random model in the same
graph (tests/tiny_model.py), many times faster."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.inference.engine import (
    Engine,
    EngineLimits,
    ErrorEvent,
    Finish,
    FinishEvent,
    GenerationRequest,
    Sequence,
    TokenEvent,
)
from services.inference.onnx_model import LENGTH_QUANTUM, DeviceSlotCache, OnnxDecoder, SlotCache, kv_buffer
from services.inference.prefix_cache import PrefixCache
from services.inference.sampling import Sampler, SamplingConfig, _choice, _nucleus, _top_k

EOS = frozenset({2})
# ChatML prompts of different lengths, tokenized once with the model's tokenizer (see _prompt).
QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "Explain in one long sentence why the sky is blue during the day."]


@pytest.fixture(scope="module")
def decoder(built_model: Path) -> OnnxDecoder:
    return OnnxDecoder(built_model / "model.onnx")


@pytest.fixture(scope="module")
def tiny_decoder(tiny_model: Path) -> OnnxDecoder:
    """The real graph with two random layers (tests/tiny_model.py): for what holds whatever the weights."""
    # One thread: its runs take a millisecond, and a second thread would only spin beside the other worker's meshes.
    return OnnxDecoder(tiny_model / "model.onnx", threads=1)


@pytest.fixture(scope="module")
def prompts(built_model: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(built_model / "tokenizer.json"))
    return [tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                             add_special_tokens=False).ids for q in QUESTIONS]


@pytest_asyncio.fixture(loop_scope="session")
async def engine(decoder: OnnxDecoder) -> AsyncIterator[Engine]:
    engine = Engine(decoder, EOS, context_length=8192)
    engine.start()
    yield engine
    await engine.close()


def request(prompt: list[int], max_tokens: int = 12, **sampling: float) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, sampling=SamplingConfig(**sampling))  # type: ignore[arg-type]


async def drain(seq: Sequence) -> tuple[list[int], FinishEvent | ErrorEvent]:
    tokens: list[int] = []
    while True:
        event = await seq.events.get()
        if isinstance(event, TokenEvent):
            tokens.append(event.sampled.token_id)
        else:
            return tokens, event


async def test_greedy_output_is_the_same_alone_and_batched(engine: Engine, prompts: list[list[int]]) -> None:
    alone = [(await drain(engine.submit(request(p))))[0] for p in prompts]
    together = await asyncio.gather(*(drain(engine.submit(request(p))) for p in prompts))
    assert [tokens for tokens, _ in together] == alone
    assert all(len(t) > 3 for t in alone)


async def test_a_request_joining_mid_generation_does_not_change_others(engine: Engine,
                                                                       prompts: list[list[int]]) -> None:
    alone, _ = await drain(engine.submit(request(prompts[2], max_tokens=20)))
    long_running = engine.submit(request(prompts[2], max_tokens=20))
    first = await long_running.events.get()
    assert isinstance(first, TokenEvent)
    joiner = engine.submit(request(prompts[0], max_tokens=6))
    rest, _ = await drain(long_running)
    await drain(joiner)
    assert [first.sampled.token_id, *rest] == alone


Plan = list[tuple[list[int], int, dict[str, float]]]


async def answers_one_at_a_time(decoder: OnnxDecoder, plan: Plan, limits: EngineLimits) -> list[list[int]]:
    """Each request's tokens on the host route, sent alone."""
    host = Engine(decoder, frozenset(), 8192, limits)
    host.start()
    try:
        return [(await drain(host.submit(request(p, max_tokens=n, **kw))))[0] for p, n, kw in plan]
    finally:
        await host.close()


def engine_on_route(decoder: OnnxDecoder, limits: EngineLimits, kv_on_device: bool, eos: frozenset[int] = frozenset(),
                    context_length: int = 8192, fixed_length: bool = False) -> Engine:
    """A started engine whose decode cache takes CUDA's route (DeviceSlotCache) over CPU memory when kv_on_device,
    its buffers the whole context long from the start (as on a GPU) when fixed_length."""
    decoder.kv_on_device, decoder.kv_fixed_length = kv_on_device, fixed_length
    try:
        engine = Engine(decoder, eos, context_length, limits)
    finally:
        decoder.kv_on_device = decoder.kv_fixed_length = False
    engine.warm()
    engine.start()
    return engine


@pytest.mark.parametrize("kv_on_device", [False, True], ids=["in-place-host", "device-rows"])
async def test_rows_leaving_and_joining_keep_every_answer(tiny_decoder: OnnxDecoder, prompts: list[list[int]],
                                                          kv_on_device: bool) -> None:
    """Sequences of different lengths leave (their row refilled from the last) while others join, many times.

    With kv_on_device the decode cache takes the GPU path's route (DeviceSlotCache: rows uploaded, moved and
    brought back one at a time by address), over CPU memory, so that route is checked without a GPU. Its answers
    are the host route's, token for token.
    """
    plan: Plan = [(p, n, {}) for n in (3, 11, 7, 15) for p in prompts]  # 12 requests, lengths interleaved
    limits = EngineLimits(max_active=5, prefix_cache_bytes=0)
    alone = await answers_one_at_a_time(tiny_decoder, plan, limits)
    engine = engine_on_route(tiny_decoder, limits, kv_on_device)
    try:
        together = await asyncio.gather(*(drain(engine.submit(request(p, max_tokens=n))) for p, n, _ in plan))
    finally:
        await engine.close()
    assert [tokens for tokens, _ in together] == alone
    assert [len(t) for t in alone] == [n for _, n, _ in plan]


async def test_fp16_variant_batches_like_it_runs_alone(built_model: Path, prompts: list[list[int]]) -> None:
    """The CUDA variant (float16 weights and KV cache) through the same engine, here on the CPU."""
    path = built_model / "model.fp16.onnx"
    if not path.exists():
        pytest.skip("no fp16 build (python -m services.model.convert --fp16)")
    half = OnnxDecoder(path)
    assert half.kv_dtype == np.float16
    engine = Engine(half, frozenset(), 8192, EngineLimits(max_active=3, prefix_cache_bytes=0))
    engine.start()
    try:
        plan = [(p, n) for n in (9, 4) for p in prompts]
        alone = [(await drain(engine.submit(request(p, max_tokens=n))))[0] for p, n in plan]
        together = await asyncio.gather(*(drain(engine.submit(request(p, max_tokens=n))) for p, n in plan))
    finally:
        await engine.close()
    assert [tokens for tokens, _ in together] == alone
    fp32 = OnnxDecoder(built_model / "model.onnx")
    reference = Engine(fp32, frozenset(), 8192)
    reference.start()
    try:
        first, _ = await drain(reference.submit(request(prompts[0], max_tokens=4)))
    finally:
        await reference.close()
    assert alone[0][:4] == first  # float16 keeps fp32's greedy choice on this prompt


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_kv_buffers_commit_memory_only_where_written() -> None:
    """16 rows of an 8192-position capacity, each holding 10 positions: a few hundred KB of pages, not the 400 MB
    of the capacity (numpy's huge pages would commit 2 MB per row and head: 96 MB here, 6 GB for a whole batch)."""
    before = _rss_bytes()
    buffer = kv_buffer((16, 3, 8192, 64), np.float32)
    buffer[:, :, :10] = 1.0
    grown = _rss_bytes() - before
    assert grown < 16 * 2**20, grown
    assert buffer[5, 2, 9, 63] == 1.0 and buffer[5, 2, 10, 0] == 0.0 and buffer.flags.writeable


@pytest.mark.parametrize("cache_type", [SlotCache, DeviceSlotCache], ids=["host", "device"])
def test_slot_cache_keeps_rows_through_growth_moves_and_pops(decoder: OnnxDecoder, cache_type: type) -> None:
    """Both decode caches; the device one (CUDA's) over CPU memory, its rows addressed by pointer."""
    heads, dim = decoder.num_kv_heads, decoder.head_dim
    slots = cache_type(decoder, max_rows=8, max_length=1024)

    def row_kv(value: float, length: int) -> list[np.ndarray]:
        return [np.full((1, heads, length, dim), value + layer, np.float32) for layer in range(2 * decoder.num_layers)]

    slots.reserve(2, 5)
    slots.put(0, row_kv(1.0, 5), 5)
    slots.put(1, row_kv(2.0, 3), 3)
    slots.reserve(3, LENGTH_QUANTUM + 1)  # grows both dimensions
    assert slots.rows == 2 and slots.length_capacity >= LENGTH_QUANTUM + 1
    slots.put(2, row_kv(3.0, 4), 4)
    assert np.array_equal(slots.row(0, 5)[7], row_kv(1.0, 5)[7])
    slots.move(2, 0, 4)  # row 0 leaves, the last row takes its place
    slots.pop()
    assert slots.rows == 2
    assert np.array_equal(slots.row(0, 4)[3], row_kv(3.0, 4)[3])
    assert np.array_equal(slots.row(1, 3)[59], row_kv(2.0, 3)[59])
    with pytest.raises(ValueError):
        slots.reserve(9, 4)
    slots.reserve(2, 8 * LENGTH_QUANTUM)  # a long sequence came and went: the memory goes back
    slots.shrink(10)
    assert slots.length_capacity == LENGTH_QUANTUM
    assert np.array_equal(slots.row(1, 3)[59], row_kv(2.0, 3)[59])


async def test_same_seed_gives_same_tokens_also_batched(engine: Engine, prompts: list[list[int]]) -> None:
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}
    first, _ = await drain(engine.submit(request(prompts[1], max_tokens=16, **sampled)))
    batched = await asyncio.gather(drain(engine.submit(request(prompts[1], max_tokens=16, **sampled))),
                                   drain(engine.submit(request(prompts[0], max_tokens=16, temperature=1.0))))
    assert batched[0][0] == first
    other, _ = await drain(engine.submit(request(prompts[1], max_tokens=16, **{**sampled, "seed": 99})))
    assert other != first


async def test_a_seeded_request_repeats_bit_for_bit_whatever_the_cache_and_company(
        tiny_decoder: OnnxDecoder, tiny_model: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded request's prompt is computed the same way every time: in pieces at fixed positions (here 32
    tokens), from the prefix cache only whole pieces that a seeded request computed that way, never KV that other
    runs computed (here an unseeded request's system prompt), whatever shares the step's budget or its first run.
    ONNX Runtime rounds differently for other chunk bounds (about 5e-5 on these logits), so the test compares
    logprobs bit for bit with an engine that has no cache, not only tokens."""
    prompt = chat_prompt(tiny_model, SYSTEM, "Why?")
    seeded = GenerationRequest(prompt_ids=prompt, max_tokens=10, top_logprobs=3,
                               sampling=SamplingConfig(temperature=0.9, top_p=0.95, seed=11))
    runs: list[tuple[int, int]] = []  # (start, end) of each prompt run holding the seeded prompt
    real_run = tiny_decoder.run

    def recording_run(ids: np.ndarray, seqlens: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> Any:
        for row in range(ids.shape[0]):
            end = int(seqlens[row]) + 1
            start = end - ids.shape[1] if ids.shape[0] == 1 else 0
            if end <= len(prompt) and list(ids[row, : end - start]) == prompt[start:end]:
                runs.append((start, end))
        return real_run(ids, seqlens, positions, past)

    async def answer(engine: Engine) -> tuple[list[tuple[int, float, list[tuple[int, float]]]], FinishEvent]:
        seq = engine.submit(seeded)
        out = []
        while True:
            event = await seq.events.get()
            if not isinstance(event, TokenEvent):
                assert isinstance(event, FinishEvent)
                return out, event
            out.append((event.sampled.token_id, event.sampled.logprob, event.sampled.top))

    def pieces(start: int) -> list[tuple[int, int]]:
        return [(s, min(s + 32, len(prompt))) for s in range(start, len(prompt), 32)
                if len(prompt) - s > 1 or s == 0]  # a last piece of one token rides in a decode run

    limits = EngineLimits(max_active=6, prefill_chunk=64)
    uncached = Engine(tiny_decoder, frozenset(), 8192, dataclasses.replace(limits, prefix_cache_bytes=0))
    engine = Engine(tiny_decoder, frozenset(), 8192, limits)
    uncached.start()
    engine.start()
    monkeypatch.setattr(tiny_decoder, "run", recording_run)
    try:
        reference, _ = await answer(uncached)
        await drain(engine.submit(request(chat_prompt(tiny_model, SYSTEM, "Hello."), max_tokens=1)))
        assert engine.prefix_cache.usable(prompt) > 300  # its system prompt, as an unseeded request computed it
        runs.clear()
        first, first_end = await answer(engine)
        first_runs, runs[:] = list(runs), []
        again, again_end = await answer(engine)  # its own whole pieces are cached now
        again_runs, runs[:] = list(runs), []
        company = [engine.submit(request(p, max_tokens=12)) for p in (prompts[0], prompts[1])]
        company.append(engine.submit(request(chat_prompt(tiny_model, SYSTEM, "Who?"), max_tokens=12)))
        batched, batched_end = await answer(engine)
        for other in company:
            await drain(other)
    finally:
        await engine.close()
        await uncached.close()
    assert len(reference) == 10 and first == reference and again == reference and batched == reference
    assert first_end.cached_prompt_tokens == 0 and first_runs == pieces(0)
    reused = (len(prompt) - 1) // 32 * 32
    assert again_end.cached_prompt_tokens == batched_end.cached_prompt_tokens == reused
    assert again_runs == runs == pieces(reused)


async def test_finish_reasons_and_usage(engine: Engine, prompts: list[list[int]]) -> None:
    tokens, end = await drain(engine.submit(request(prompts[0], max_tokens=64)))
    assert isinstance(end, FinishEvent) and end.reason == Finish.STOP
    assert end.completion_tokens == len(tokens) and end.prompt_tokens == len(prompts[0])
    tokens, end = await drain(engine.submit(request(prompts[0], max_tokens=3)))
    assert isinstance(end, FinishEvent) and end.reason == Finish.LENGTH and len(tokens) == 3
    stop_at = tokens[1]
    seq = engine.submit(GenerationRequest(prompt_ids=prompts[0], max_tokens=10, sampling=SamplingConfig(),
                                          stop_ids=frozenset({stop_at})))
    cut, end = await drain(seq)
    assert cut == tokens[:1] and isinstance(end, FinishEvent) and end.reason == Finish.STOP


@pytest.mark.parametrize("room", [1, 2, 9])
async def test_prompt_and_answer_fill_the_context_exactly(decoder: OnnxDecoder, prompts: list[list[int]],
                                                          room: int) -> None:
    """A generation that runs into the context ends LENGTH with prompt + completion == context, not one more."""
    prompt = prompts[2]
    engine = Engine(decoder, frozenset(), context_length=len(prompt) + room, limits=EngineLimits(max_active=4))
    engine.start()
    try:
        alone = engine.submit(request(prompt, max_tokens=100))
        batched = [engine.submit(request(p, max_tokens=100)) for p in (prompt, prompts[0][:10])]
        for seq in (alone, *batched):  # no end-of-turn ids: each runs into the context
            tokens, end = await drain(seq)
            assert isinstance(end, FinishEvent) and end.reason == Finish.LENGTH
            assert end.completion_tokens == len(tokens)
            assert end.prompt_tokens + end.completion_tokens == engine.context_length
    finally:
        await engine.close()


async def test_cancel_ends_within_one_step(engine: Engine, prompts: list[list[int]]) -> None:
    seq = engine.submit(request(prompts[2], max_tokens=200))
    for _ in range(3):
        assert isinstance(await seq.events.get(), TokenEvent)
    steps_at_cancel = engine.steps
    engine.cancel(seq)
    _, end = await drain(seq)
    assert isinstance(end, FinishEvent) and end.reason == Finish.CANCELLED
    assert seq.tokens_after_cancel <= 1
    assert engine.steps - steps_at_cancel <= 2
    assert engine.load()["active"] == 0


async def test_queue_full_is_refused_at_once(decoder: OnnxDecoder, prompts: list[list[int]]) -> None:
    engine = Engine(decoder, EOS, 8192, EngineLimits(max_active=2, max_queue=1))
    # Not started, so nothing is admitted yet: a burst still gets the 2 decode slots plus the 1 queue place.
    for _ in range(3):
        engine.submit(request(prompts[0]))
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as caught:
        engine.submit(request(prompts[0]))
    assert time.monotonic() - started < 0.1
    assert caught.value.retry_after_s is not None
    # Typed for clients: which limit (QuotaFailure), not only a message to parse.
    assert caught.value.reason == "QUEUE_FULL" and caught.value.limit is not None
    assert caught.value.limit.id == "inference.queue" and caught.value.limit.value == engine.limits.max_queue


def ranked(prompt: list[int], priority: int, max_tokens: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, sampling=SamplingConfig(), priority=priority)


async def first_token(seq: Sequence) -> None:
    """Waits until `seq` has its first token: it holds a decode place."""
    assert isinstance(await seq.events.get(), TokenEvent)


def assert_shed(seq: Sequence, engine: Engine) -> None:
    event = seq.events.get_nowait()
    assert isinstance(event, ErrorEvent) and isinstance(event.error, ResourceExhausted), event
    error = event.error
    assert seq.done and seq.generated == 0 and error.reason == "SHED" and "higher priority" in error.message
    # As honest as a refusal: the same retry delay and the same limit (QuotaFailure).
    assert error.retry_after_s == 1.0 and error.limit is not None
    assert (error.limit.id, error.limit.value) == ("inference.queue", engine.limits.max_queue)


async def test_a_freed_place_goes_to_the_highest_priority_waiting(decoder: OnnxDecoder,
                                                                   prompts: list[list[int]]) -> None:
    """max_active=1, max_queue=2: low, low, then high; once the first low's place frees, high runs before the
    other low, although it came later."""
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(max_active=1, max_queue=2))  # no end-of-turn id
    engine.start()
    try:
        running = engine.submit(ranked(prompts[0], 0, max_tokens=500))
        await first_token(running)
        low = engine.submit(ranked(prompts[1], 0))
        high = engine.submit(ranked(prompts[1], 5))
        assert engine.load()["queued"] == 2 and engine.load()["active"] == 1
        engine.cancel(running)
        ends = await asyncio.gather(drain(running), drain(high), drain(low))
    finally:
        await engine.close()
    assert [end.reason for _, end in ends] == [Finish.CANCELLED, Finish.LENGTH, Finish.LENGTH]  # type: ignore[union-attr]
    assert running.finish_ns <= high.prefill_start_ns < high.finish_ns <= low.prefill_start_ns
    assert engine.load()["queued"] == engine.load()["active"] == 0


async def test_the_queue_is_first_come_first_served_within_a_priority(decoder: OnnxDecoder,
                                                                      prompts: list[list[int]]) -> None:
    engine = Engine(decoder, EOS, 8192, EngineLimits(max_active=1, max_queue=8))
    # Not started: everything waits, then the places are given out one at a time.
    priorities = [1, 0, 1, 9, 0, 9, 1]
    seqs = [engine.submit(ranked(prompts[0], p, max_tokens=1)) for p in priorities]
    engine.start()
    try:
        await asyncio.gather(*(drain(s) for s in seqs))
    finally:
        await engine.close()
    admitted = sorted(range(len(seqs)), key=lambda i: seqs[i].prefill_start_ns)
    assert admitted == [3, 5, 0, 2, 6, 1, 4]


async def test_a_full_queue_sheds_its_lowest_priority_newest_first_for_a_higher_one(
        decoder: OnnxDecoder, prompts: list[list[int]]) -> None:
    """Queue full of lows + a high: the newest low ends RESOURCE_EXHAUSTED (SHED) at once, the high takes its
    place and runs before the older low; the one decoding is never preempted."""
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(max_active=1, max_queue=2))
    engine.start()
    try:
        running = engine.submit(ranked(prompts[0], 0, max_tokens=500))
        await first_token(running)
        old_low, new_low = engine.submit(ranked(prompts[1], 0)), engine.submit(ranked(prompts[1], 0))
        high = engine.submit(ranked(prompts[1], 3))
        assert_shed(new_low, engine)
        assert not old_low.done and not high.done and not running.done
        assert engine.load()["queued"] == 2 and engine.load()["active"] == 1
        assert engine.shed == {0: 1}
        tokens_before = running.generated
        await first_token(running)  # still decoding: nothing admitted is preempted
        assert running.generated > tokens_before
        engine.cancel(running)
        await asyncio.gather(drain(running), drain(high), drain(old_low))
    finally:
        await engine.close()
    assert high.finish_ns <= old_low.prefill_start_ns


def test_shedding_takes_the_lowest_priority_and_refuses_what_is_not_higher(decoder: OnnxDecoder,
                                                                           prompts: list[list[int]]) -> None:
    engine = Engine(decoder, EOS, 8192, EngineLimits(max_active=1, max_queue=1))
    # Not started: it holds max_active + max_queue = 2 waiting.

    def refused(priority: int) -> ResourceExhausted:
        with pytest.raises(ResourceExhausted) as caught:
            engine.submit(ranked(prompts[0], priority))
        assert caught.value.reason == "QUEUE_FULL" and caught.value.retry_after_s == 1.0
        return caught.value

    zero, three = engine.submit(ranked(prompts[0], 0)), engine.submit(ranked(prompts[0], 3))
    five = engine.submit(ranked(prompts[0], 5))
    assert_shed(zero, engine)  # the lowest priority goes first, though it is not the newest
    refused(0)
    refused(3)  # equal to the lowest waiting: refused at once, nobody shed
    second_five = engine.submit(ranked(prompts[0], 5))
    assert_shed(three, engine)
    assert "none below priority 5" in refused(5).message
    top = engine.submit(ranked(prompts[0], 9))
    assert_shed(second_five, engine)  # among equals, the newest
    assert not five.done and not top.done and five.events.empty() and top.events.empty()
    assert engine.load()["queued"] == 2 and engine.shed == {0: 1, 3: 1, 5: 1}


def test_a_cancelled_waiter_gives_its_place_up_before_anyone_is_shed(decoder: OnnxDecoder,
                                                                     prompts: list[list[int]]) -> None:
    engine = Engine(decoder, EOS, 8192, EngineLimits(max_active=1, max_queue=1))
    first, second = engine.submit(ranked(prompts[0], 0)), engine.submit(ranked(prompts[0], 0))
    engine.cancel(first)
    third = engine.submit(ranked(prompts[0], 0))  # equal priority, yet queued: the cancelled one's place was free
    end = first.events.get_nowait()
    assert isinstance(end, FinishEvent) and end.reason == Finish.CANCELLED
    assert not second.done and not third.done and engine.shed == {} and engine.load()["queued"] == 2


async def test_deadline_passing_mid_generation_ends_the_stream(decoder: OnnxDecoder, prompts: list[list[int]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The model thread chains decode runs while nothing changes; a deadline still ends the stream within a step.

    Judged by the decode runs the model thread started, not by wall time: on a busy machine one step can take
    hundreds of milliseconds, yet only the step in flight when the deadline passes may start after it."""
    runs: list[tuple[float, float]] = []
    decode = decoder.decode

    def timed_decode(*args: Any) -> np.ndarray:
        started = time.monotonic()
        try:
            return decode(*args)
        finally:
            runs.append((started, time.monotonic()))

    monkeypatch.setattr(decoder, "decode", timed_decode)
    engine = Engine(decoder, frozenset(), 8192)  # no end-of-turn id: only the deadline can end it early
    engine.start()
    try:
        # The deadline falls a few steps into a chain of runs (RUN_AHEAD_STEPS), at this machine's pace right now.
        submitted = time.monotonic()
        await drain(engine.submit(GenerationRequest(prompt_ids=prompts[2], max_tokens=4, sampling=SamplingConfig())))
        prefill_and_three_steps = time.monotonic() - submitted
        step = (runs[-1][1] - runs[-3][1]) / 2
        runs.clear()
        deadline = time.monotonic() + prefill_and_three_steps + 4 * step
        seq = engine.submit(GenerationRequest(prompt_ids=prompts[2], max_tokens=500, sampling=SamplingConfig(),
                                              deadline=deadline))
        tokens, end = await drain(seq)
        ended = time.monotonic()
    finally:
        await engine.close()
    assert isinstance(end, ErrorEvent) and isinstance(end.error, DeadlineExceeded)
    assert 0 < len(tokens) < 500
    assert sum(1 for start, _ in runs if start <= deadline) >= 2  # a chain of runs was under way
    started_late = [start for start, _ in runs if start > deadline]
    assert len(started_late) <= 1, f"{len(started_late)} decode runs started after the deadline"
    assert ended < max(deadline, max(finish for _, finish in runs)) + 1.0  # the loop hands the end over at once


async def test_expired_request_is_dropped_from_the_queue(decoder: OnnxDecoder, prompts: list[list[int]]) -> None:
    engine = Engine(decoder, EOS, 8192, EngineLimits(max_active=1, max_queue=4))
    engine.start()
    try:
        busy = engine.submit(request(prompts[2], max_tokens=30))
        expiring = engine.submit(GenerationRequest(prompt_ids=prompts[0], max_tokens=5, sampling=SamplingConfig(),
                                                   deadline=time.monotonic() + 0.05))
        _, end = await drain(expiring)
        assert isinstance(end, ErrorEvent) and isinstance(end.error, DeadlineExceeded)
        assert expiring.generated == 0  # never ran
        await drain(busy)
    finally:
        await engine.close()


@pytest.mark.parametrize(("field", "kwargs"), [
    ("temperature", {"temperature": -0.1}), ("temperature", {"temperature": 2.5}),
    ("temperature", {"temperature": float("nan")}), ("top_p", {"top_p": 1.5}), ("top_p", {"top_p": -0.2}),
    ("top_k", {"top_k": -1}), ("repetition_penalty", {"repetition_penalty": 3.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}), ("presence_penalty", {"presence_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": float("inf")}), ("frequency_penalty", {"frequency_penalty": -2.01}),
    ("frequency_penalty", {"frequency_penalty": float("nan")}), ("logit_bias", {"logit_bias": {49152: 1.0}}),
    ("logit_bias", {"logit_bias": {-1: 1.0}}), ("logit_bias", {"logit_bias": {7: 100.5}}),
    ("logit_bias", {"logit_bias": {7: float("-inf")}}), ("logit_bias", {"logit_bias": dict.fromkeys(range(1025), 1.0)}),
])
def test_every_sampling_parameter_is_validated(field: str, kwargs: dict[str, Any]) -> None:
    values = {"temperature": 0.0, "top_p": 0.0, "top_k": 0, "seed": 0, "repetition_penalty": 0.0, **kwargs}
    with pytest.raises(InvalidArgument) as caught:
        SamplingConfig.validated(vocab_size=49152, **values)  # type: ignore[arg-type]
    assert field in caught.value.message


def test_top_k_beyond_the_vocabulary_is_off() -> None:
    values = {"temperature": 1.0, "top_p": 0.0, "seed": 0, "repetition_penalty": 0.0}
    assert SamplingConfig.validated(top_k=10**6, vocab_size=49152, **values).top_k == 0
    assert SamplingConfig.validated(top_k=49152, vocab_size=49152, **values).top_k == 0
    assert SamplingConfig.validated(top_k=49151, vocab_size=49152, **values).top_k == 49151


def test_sampler_filters_and_penalties() -> None:
    logits = np.log(np.asarray([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=7), []).sample(logits).token_id == 0
    assert Sampler(SamplingConfig(temperature=1.0, top_p=0.4, seed=7), []).sample(logits).token_id == 0
    draws = {Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=s), []).sample(logits).token_id
             for s in range(1, 60)}
    assert draws == {0, 1}
    penalized = Sampler(SamplingConfig(repetition_penalty=2.0), [0]).sample(logits)
    assert penalized.token_id == 1
    with_top = Sampler(SamplingConfig(), [], top_logprobs=3).sample(logits)
    assert [t for t, _ in with_top.top] == [0, 1, 2]
    assert with_top.logprob == pytest.approx(np.log(0.5), abs=1e-5)


def test_openais_penalties_and_logit_bias_steer_a_greedy_answer() -> None:
    """Token 0 leads token 1 by 1.0 and token 1 leads token 2 by 1.0, at every step."""
    logits = np.asarray([3.0, 2.0, 1.0, -5.0], dtype=np.float32)

    def answer(**settings: Any) -> list[int]:
        sampler = Sampler(SamplingConfig(**settings), [0, 1, 2])  # prompt tokens do not count
        assert sampler.plain_greedy == (not settings)  # the engine's vectorized greedy path would skip them
        return [sampler.sample(logits).token_id for _ in range(6)]

    assert answer() == [0] * 6
    assert answer(presence_penalty=1.5) == [0, 1, 0, 0, 0, 0]  # 3 - 1.5 against 2 - 1.5 against 1: once each
    assert answer(frequency_penalty=0.6) == [0, 0, 1, 0, 1, 0]  # 3 - 0.6 a time against 2 - 0.6 a time
    assert answer(presence_penalty=-2.0) == [0] * 6
    assert answer(logit_bias=((0, -100.0),)) == [1] * 6  # banned
    assert answer(logit_bias=((3, 100.0),)) == [3] * 6  # all but forced
    forced = Sampler(SamplingConfig(logit_bias=((3, 100.0),)), [], top_logprobs=2).sample(logits)
    assert forced.logprob == pytest.approx(0.0, abs=1e-6) and [t for t, _ in forced.top] == [3, 0]


def _reference_sample(config: SamplingConfig, rng: np.random.Generator, seen: set[int],
                      logits: np.ndarray, counts: dict[int, int] | None = None) -> tuple[int, float]:
    """The textbook sampler, sorting the whole vocabulary: what Sampler must match token for token. `counts`: how
    often each token came out so far (OpenAI's formula for the presence and frequency penalties)."""
    scores = logits.astype(np.float64)
    for token, bias in config.logit_bias:
        scores[token] += bias
    for i in seen:
        scores[i] = scores[i] / config.repetition_penalty if scores[i] > 0 else scores[i] * config.repetition_penalty
    for token, times in (counts or {}).items():
        scores[token] -= times * config.frequency_penalty + (times > 0) * config.presence_penalty
    if not config.greedy:
        scores = scores / config.temperature
    logprobs = scores - scores.max() - np.log(np.sum(np.exp(scores - scores.max())))
    if config.greedy:
        return int(np.argmax(scores)), float(logprobs[np.argmax(scores)])
    if not config.top_k and config.top_p == 1.0:  # no filter: the draw walks the vocabulary by id
        cdf = np.cumsum(np.exp(logprobs))
        token = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return token, float(logprobs[token])
    order = np.argsort(-logprobs, kind="stable")  # a filter: most likely first, ties by id
    if config.top_k:
        order = order[: config.top_k]
    probs = np.exp(logprobs[order])
    if config.top_p < 1.0:
        cumulative = np.cumsum(probs) / probs.sum()
        order = order[: int(np.searchsorted(cumulative, config.top_p)) + 1]
        probs = probs[: order.size]
    cdf = np.cumsum(probs)
    token = int(order[np.searchsorted(cdf, rng.random() * cdf[-1], side="right")])
    return token, float(logprobs[token])


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.8, seed=11),
    SamplingConfig(temperature=0.7, top_p=0.9, seed=12),
    SamplingConfig(temperature=1.3, top_p=0.995, seed=13),  # a nucleus wider than the first margin
    SamplingConfig(temperature=1.0, top_k=50, seed=14),
    SamplingConfig(temperature=1.0, top_k=200, top_p=0.8, seed=15),
    SamplingConfig(temperature=0.9, top_p=0.95, repetition_penalty=1.3, seed=16),
    SamplingConfig(repetition_penalty=1.5),
    SamplingConfig(temperature=0.8, presence_penalty=1.5, frequency_penalty=0.7, seed=17),
    SamplingConfig(frequency_penalty=2.0),
    SamplingConfig(presence_penalty=-2.0, frequency_penalty=1.0),
    SamplingConfig(temperature=1.0, top_p=0.9, seed=18, logit_bias=((5, 8.0), (100, -100.0), (49151, 3.5))),
    SamplingConfig(temperature=0.6, top_k=40, repetition_penalty=1.2, presence_penalty=0.5, seed=19,
                   logit_bias=((3, 2.0),)),
], ids=str)
def test_sampler_draws_what_a_full_sort_draws(config: SamplingConfig) -> None:
    """The fast paths (no full sort, blockwise inverse CDF) draw the textbook's tokens from the same seed."""
    rng = np.random.default_rng(3)
    vocab = 49152
    prompt = [int(t) for t in rng.integers(0, vocab, 30)]
    sampler = Sampler(config, prompt)
    reference_rng = np.random.default_rng(config.seed)
    seen = set(prompt) if config.repetition_penalty != 1.0 else set()
    counts: dict[int, int] = {}
    for step in range(40):
        # Logits shaped like a language model's: a few strong candidates over a long, flat tail.
        logits = rng.standard_normal(vocab).astype(np.float32) * 2.0
        logits[rng.integers(0, vocab, 8)] += rng.uniform(4, 10, 8).astype(np.float32)
        logits[prompt[step % len(prompt)]] += 9.0  # a prompt token in contention, for the penalty
        if counts:  # and a token already generated, for the output's penalties
            logits[list(counts)[step % len(counts)]] += 9.0
        expected, expected_logprob = _reference_sample(config, reference_rng, seen,
                                                       logits, counts if config.penalizes_output else None)
        got = sampler.sample(logits)
        assert got.token_id == expected, f"step {step}"
        assert got.logprob == pytest.approx(expected_logprob, abs=1e-4)
        if seen:
            seen.add(expected)
        counts[expected] = counts.get(expected, 0) + 1


@pytest.mark.parametrize("top_p", [0.5, 0.9, float(np.float32(0.99999994))])
def test_nucleus_beyond_every_margin_is_still_a_full_sorts(top_p: float) -> None:
    # One strong token over a far tail: at the highest top_p the nucleus reaches tokens 25 below the peak,
    # outside both margins, so the full-vocabulary fallback decides.
    scores = np.zeros(49152)
    scores[7], scores[100:140] = 25.0, 1.5
    weights = np.exp(scores - scores.max())
    order = np.argsort(-scores, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    expected = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    assert list(_nucleus(scores, scores.max(), weights, top_p)) == list(expected)
    assert expected.size > 41 if top_p > 0.9999 else expected.size == 1


def test_top_k_breaks_ties_by_id() -> None:
    scores = np.zeros(1000)
    scores[[900, 5]] = 2.0, 1.0
    assert list(_top_k(scores, 5)) == [900, 5, 0, 1, 2]


@pytest.mark.parametrize("size", [300, 49152, 49152 + 77])  # one cumulative sum; whole blocks; a partial block
def test_choice_draws_each_index_by_its_weight(size: int) -> None:
    weights = np.zeros(size, dtype=np.float32)
    support = np.random.default_rng(size).choice(size, 12, replace=False)  # spread over blocks, zeros between
    weights[support] = np.arange(1, 13, dtype=np.float32)
    weights[support[0]] = 1e-30  # possible, if barely
    rng = np.random.default_rng(9)
    draws = np.asarray([_choice(rng, weights) for _ in range(20000)])
    assert set(draws) <= set(support)  # never a zero-weight index
    expected = weights[support] / weights.sum(dtype=np.float64) * draws.size
    observed = np.asarray([(draws == i).sum() for i in support])
    chi2 = float(((observed - expected)[1:] ** 2 / expected[1:]).sum())
    assert chi2 < 40, (chi2, observed, expected.round())  # 10 degrees of freedom: p < 1e-5 under the null
    again = np.random.default_rng(9)
    assert [_choice(again, weights) for _ in range(100)] == list(draws[:100])


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
def test_any_int64_is_a_seed(seed: int) -> None:
    logits = np.zeros(64, dtype=np.float32)
    config = SamplingConfig.validated(temperature=1.0, top_p=0.0, top_k=0, seed=seed, repetition_penalty=0.0,
                                      vocab_size=64)
    runs = [[sampler.sample(logits).token_id for _ in range(16)] for sampler in (Sampler(config, []),
                                                                               Sampler(config, []))]
    assert runs[0] == runs[1]  # reproducible
    sequence = Sampler(config, [])
    other = Sampler(dataclasses.replace(config, seed=seed + (1 if seed < 2**63 - 1 else -1)), [])
    assert [sequence.sample(logits).token_id for _ in range(16)] != [other.sample(logits).token_id for _ in range(16)]


SYSTEM = ("You are a meticulous assistant for a logistics company. " * 40).strip()


def chat_prompt(tokenizer_dir: Path, system: str, question: str) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return tokenizer.encode(text, add_special_tokens=False).ids


def _kv(tokens: list[int]) -> list[np.ndarray]:
    """A stand-in KV cache whose position t holds token t's id (so a lookup's slice can be checked)."""
    return [np.asarray(tokens, dtype=np.float32).reshape(1, 1, -1, 1).repeat(2, axis=1) for _ in range(2)]


def _positions(kv: list[np.ndarray]) -> list[int]:
    return [int(x) for x in kv[0][0, 0, :, 0]]


def test_prefix_cache_stores_a_shared_prefix_once_and_serves_the_longest_match() -> None:
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=4, block_tokens=8)
    system = list(range(100, 124))  # three whole blocks
    first, second = [*system, *range(1, 11)], [*system, *range(50, 61)]
    cache.insert(first, _kv(first))
    cache.insert(second, _kv(second))
    assert cache.tokens_stored == len(system) + 10 + 11  # the system prompt once
    n, kv = cache.lookup([*system, 1, 2, 3, 99, 98])  # branches inside a block
    assert n == len(system) + 3 and kv is not None and _positions(kv) == [*system, 1, 2, 3]
    assert cache.lookup(first)[0] == len(first) - 1  # the last prompt token always runs
    n, kv = cache.lookup([*second, 5])
    assert n == len(second) and kv is not None and _positions(kv) == second
    assert cache.lookup([100, 101, 102, 0])[0] == 0  # under min_tokens: a miss
    stats = dataclasses.replace(cache.stats)
    for prompt in ([*system, 1, 2, 3, 99], first, [100, 101, 102, 0], [7] * 40):
        assert cache.usable(prompt) == cache.lookup(prompt)[0]  # what a lookup will serve, without copying
    assert cache.stats.hits == stats.hits + 2 and cache.stats.misses == stats.misses + 2  # usable counts none
    cache.insert(first[:30], _kv(first[:30]))  # already held
    assert cache.tokens_stored == len(system) + 21
    longer = [*first, 7, 7, 7]  # extends the tail block [9, 10]: the old tail goes
    cache.insert(longer, _kv(longer))
    assert cache.tokens_stored == len(system) + 24
    n, kv = cache.lookup([*longer, 0])
    assert n == len(longer) and kv is not None and _positions(kv) == longer


def test_an_exact_lookup_serves_only_exact_blocks_in_whole_pieces() -> None:
    """A seeded request's lookup (exact_piece) serves only blocks a seeded request computed, as a multiple of its
    piece; marking a held block exact gives it the exact computation's KV."""
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=4, block_tokens=8)
    prompt = list(range(100, 150))  # 50 tokens
    cache.insert(prompt, _kv(prompt))  # an unseeded request's computation
    assert cache.usable(prompt) == 49 and cache.usable(prompt, exact_piece=16) == 0
    exact = [layer + 0.5 for layer in _kv(prompt)]  # the same tokens' KV, rounded another way
    cache.insert(prompt, exact, exact_tokens=40)  # its pieces of 16: [0, 48) whole; blocks inside [0, 40): 5
    n, kv = cache.lookup([*prompt, 1], exact_piece=16)
    assert n == 32 and kv is not None and np.array_equal(kv[0], exact[0][:, :, :32])  # it replaced the held KV
    assert cache.lookup([*prompt[:20], 7, 7, 7], exact_piece=16)[0] == 16
    assert cache.lookup([*prompt[:12], 7], exact_piece=16)[0] == 0  # under one piece
    assert cache.lookup([*prompt, 1])[0] == 50  # everyone else is served as before
    cache.insert([5, *prompt], _kv([5, *prompt]), exact_tokens=48)
    assert cache.lookup([5, *prompt], exact_piece=16)[0] == 48


def test_prefix_cache_evicts_least_recently_used_leaves_and_keeps_shared_prefixes() -> None:
    system = list(range(100, 116))
    branches = [[*system, *range(k * 10, k * 10 + 8)] for k in range(1, 6)]
    token_bytes = sum(layer.nbytes for layer in _kv([0]))
    cache = PrefixCache(max_bytes=(16 + 4 * 8) * token_bytes, min_tokens=4, block_tokens=8)
    for branch in branches[:4]:
        cache.insert(branch, _kv(branch))
    assert cache.bytes_used == cache.max_bytes
    assert cache.lookup([*branches[0], 0])[0] == 24  # now the second branch is the least recently used
    cache.insert(branches[4], _kv(branches[4]))
    assert cache.stats.evictions == 1 and cache.bytes_used == cache.max_bytes
    assert cache.lookup([*branches[1], 0])[0] == 16  # its own block went; the shared system prompt stayed
    for kept in (0, 2, 3, 4):
        assert cache.lookup([*branches[kept], 0])[0] == 24
    too_big = list(range(500, 600))  # over half the cache: its first whole blocks that fit in half are kept
    cache.insert(too_big, _kv(too_big))
    n, kv = cache.lookup([*too_big, 0])
    assert n == 24 and kv is not None and _positions(kv) == too_big[:24]
    assert cache.bytes_used == cache.max_bytes and cache.stats.evictions == 4  # the three oldest leaves made room
    assert cache.lookup([*branches[4], 0])[0] == 24  # the most recently used conversation stayed
    tiny = PrefixCache(max_bytes=24 * token_bytes, min_tokens=4, block_tokens=8)
    tiny.insert(too_big, _kv(too_big))  # half the cache holds one block, at least min_tokens: kept
    assert tiny.tokens_stored == 8
    tinier = PrefixCache(max_bytes=12 * token_bytes, min_tokens=4, block_tokens=8)
    tinier.insert(too_big, _kv(too_big))  # half holds no whole block: nothing stored
    assert tinier.tokens_stored == 0 and tinier.bytes_used == 0


async def test_prefix_hit_gives_same_tokens_and_shorter_time_to_first_token(
        decoder: OnnxDecoder, built_model: Path) -> None:
    first_q = chat_prompt(built_model, SYSTEM, "Which day comes after Monday?")
    second_q = chat_prompt(built_model, SYSTEM, "How many wheels does a bicycle have?")
    assert len(first_q) > 400
    cold = Engine(decoder, EOS, 8192, EngineLimits(prefix_cache_bytes=0, prefill_chunk=4096))
    warm = Engine(decoder, EOS, 8192, EngineLimits(prefill_chunk=4096))
    cold.start()
    warm.start()
    try:
        reference, _ = await drain(cold.submit(request(second_q, max_tokens=10)))
        await drain(warm.submit(request(first_q, max_tokens=2)))  # fills the cache with the system prompt
        assert warm.prefix_cache.tokens_stored >= len(first_q)  # and its answer
        miss = cold.submit(request(second_q, max_tokens=10))
        miss_tokens, miss_end = await drain(miss)
        hit = warm.submit(request(second_q, max_tokens=10))
        hit_tokens, hit_end = await drain(hit)
        assert hit_tokens == miss_tokens == reference
        assert isinstance(hit_end, FinishEvent) and hit_end.cached_prompt_tokens > 400
        assert isinstance(miss_end, FinishEvent) and miss_end.cached_prompt_tokens == 0
        assert warm.prefix_cache.stats.hits == 1 and warm.prefix_cache.stats.hit_tokens == hit.cached_tokens
        ttft_miss = miss.first_token_ns - miss.enqueued_ns
        ttft_hit = hit.first_token_ns - hit.enqueued_ns
        assert ttft_hit < 0.6 * ttft_miss, (ttft_hit / 1e6, ttft_miss / 1e6)
    finally:
        await cold.close()
        await warm.close()


@pytest.mark.parametrize("kv_on_device", [False, True], ids=["host", "device"])
async def test_a_prompt_sent_again_joins_the_decode_run_without_a_prompt_run(
        tiny_decoder: OnnxDecoder, tiny_model: Path, kv_on_device: bool) -> None:
    """All but its last token come from the prefix cache: that token is the input of the batch's next decode run
    (no run of its own), and the answer is the same as the first time, alone or beside generating streams."""
    prompts = [chat_prompt(tiny_model, SYSTEM, q) for q in QUESTIONS]
    reference_engine = engine_on_route(tiny_decoder, EngineLimits(prefix_cache_bytes=0), kv_on_device)
    engine = engine_on_route(tiny_decoder, EngineLimits(), kv_on_device)
    prompt_runs = 0
    real_run = tiny_decoder.run

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        nonlocal prompt_runs
        prompt_runs += 1
        return real_run(*args, **kwargs)

    try:
        expected = [(await drain(reference_engine.submit(request(p, max_tokens=8))))[0] for p in prompts[:2]]
        for prompt in prompts[:2]:
            await drain(engine.submit(request(prompt, max_tokens=8)))  # the prompt and its answer are cached now
        tiny_decoder.run = counting_run  # type: ignore[method-assign]
        alone, end = await drain(engine.submit(request(prompts[0], max_tokens=8)))
        assert prompt_runs == 0 and alone == expected[0]
        assert isinstance(end, FinishEvent) and end.cached_prompt_tokens == len(prompts[0]) - 1
        # Beside a stream that is generating: it joins that stream's decode run.
        busy = engine.submit(request(prompts[2], max_tokens=400))  # still generating when the next one comes
        first = await busy.events.get()
        assert isinstance(first, TokenEvent)
        joined, _ = await drain(engine.submit(request(prompts[1], max_tokens=8)))
        await drain(busy)
        assert joined == expected[1]
        assert prompt_runs == 1  # the busy stream's own prompt, not cached
    finally:
        tiny_decoder.run = real_run  # type: ignore[method-assign]
        await reference_engine.close()
        await engine.close()


@pytest.mark.parametrize("kv_on_device", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("company", [0, 3], ids=["alone", "leaving a batch of 4"])
async def test_a_finished_turn_is_reused_by_the_conversations_next_turn(
        tiny_decoder: OnnxDecoder, tiny_model: Path, prompts: list[list[int]], company: int,
        kv_on_device: bool) -> None:
    """Prefix reuse covers earlier turns: the answer's KV too, not only the prompt's. On the device route (CUDA's,
    over CPU memory here) the answer's KV is the leaving row brought back from the device. On the tiny model the
    turn's end is a token its greedy answer reaches after some steps, made the end-of-turn token of these engines."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    first = chat_prompt(tiny_model, "You are a helpful assistant.", "Name three colors.")
    probe = Engine(tiny_decoder, frozenset(), 8192, EngineLimits(prefix_cache_bytes=0))
    probe.start()
    try:
        greedy, _ = await drain(probe.submit(request(first, max_tokens=40)))
    finally:
        await probe.close()
    end = next(i for i, token in enumerate(greedy) if i >= 8 and token not in greedy[:i])
    eos = frozenset({greedy[end]})
    warm = engine_on_route(tiny_decoder, EngineLimits(), kv_on_device, eos)
    cold = Engine(tiny_decoder, eos, 8192, EngineLimits(prefix_cache_bytes=0))
    cold.start()
    try:
        others = [warm.submit(request(prompts[i % len(prompts)], max_tokens=40)) for i in range(company)]
        answer, finish = await drain(warm.submit(request(first, max_tokens=96)))
        assert isinstance(finish, FinishEvent) and finish.reason == Finish.STOP  # the turn ended: the model said so
        assert answer == greedy[:end]  # the end-of-turn token is not part of the answer
        for other in others:
            await drain(other)
        follow_up = [*first, *answer, *tokenizer.encode(
            "<|im_end|>\n<|im_start|>user\nThree more, please.<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False).ids]
        hit_tokens, hit_end = await drain(warm.submit(request(follow_up, max_tokens=12)))
        miss_tokens, _ = await drain(cold.submit(request(follow_up, max_tokens=12)))
        assert hit_tokens == miss_tokens
        # Every token of the first turn, its answer included, came from the cache.
        assert isinstance(hit_end, FinishEvent) and hit_end.cached_prompt_tokens == len(first) + len(answer)
    finally:
        await warm.close()
        await cold.close()


def test_every_finished_turn_leaving_in_one_step_is_kept_for_reuse(decoder: OnnxDecoder) -> None:
    """Three turns end in the same step, the last row among them, while another sequence decodes on: each one's
    KV (prompt and fed answer tokens) is kept as it was in its row, before the rows are compacted."""
    engine = Engine(decoder, EOS, 8192)
    rng = np.random.default_rng(0)
    shape = (1, decoder.num_kv_heads, 0, decoder.head_dim)

    def sequence(first_token: int, prompt_len: int, answer: int) -> tuple[Sequence, list[np.ndarray]]:
        prompt = list(range(first_token, first_token + prompt_len))
        seq = Sequence(id=first_token, request=request(prompt), sampler=Sampler(SamplingConfig(), prompt))
        seq.past_len = prompt_len + answer
        seq.output_ids = list(range(first_token + 500, first_token + 500 + answer + 1))  # the last is EOS
        kv = [rng.standard_normal((*shape[:2], seq.past_len, shape[3])).astype(decoder.kv_dtype)
              for _ in decoder.past_names]
        seq.kv = kv
        return seq, kv

    staying, _ = sequence(1000, 20, 3)
    leaving = [sequence(2000 + 100 * i, 18 + i, 2 + i) for i in range(3)]
    engine._sync_rows([staying, *(s for s, _ in leaving)])
    for seq, _ in leaving:
        seq.reusable = True  # each ended its turn
    engine._sync_rows([staying])
    assert engine._rows == [staying]
    for seq, kv in leaving:
        tokens = [*seq.request.prompt_ids, *seq.output_ids[:-1], 7]
        cached, cached_kv = engine.prefix_cache.lookup(tokens)
        assert cached == seq.past_len and cached_kv is not None
        assert all(np.array_equal(c, k) for c, k in zip(cached_kv, kv, strict=True))


def test_fresh_prompts_of_very_different_lengths_run_apart() -> None:
    from services.inference.engine import _padding_groups

    def ends(groups: list[list[tuple[Sequence, int, int]]]) -> list[list[int]]:
        return [[end for _, _, end in group] for group in groups]

    def chunks(*lengths: int) -> list[tuple[Sequence, int, int]]:
        return [(None, 0, n) for n in lengths]  # type: ignore[misc]

    assert ends(_padding_groups(chunks(40, 42, 42))) == [[40, 42, 42]]
    assert ends(_padding_groups(chunks(10, 12, 14, 128))) == [[10, 12, 14], [128]]
    assert ends(_padding_groups(chunks(5, 100, 110, 120))) == [[5], [100, 110, 120]]


async def test_a_short_prompt_is_not_queued_behind_long_prefills(
        decoder: OnnxDecoder, built_model: Path, prompts: list[list[int]]) -> None:
    longs = [chat_prompt(built_model, SYSTEM, q) for q in ("Summarise your instructions.", "Who are you?")]
    limits = EngineLimits(prefill_chunk=64, prefix_cache_bytes=0)
    engine = Engine(decoder, EOS, 8192, limits)
    engine.start()
    try:
        alone = [(await drain(engine.submit(request(p, max_tokens=4))))[0] for p in (*longs, prompts[0])]
        waiting = [engine.submit(request(p, max_tokens=4)) for p in longs]  # 2 x ~450 tokens: ~14 steps
        short = engine.submit(request(prompts[0], max_tokens=4))
        short_tokens, _ = await drain(short)
        # The short prompt was prefilled beside the oldest long one, not after both.
        assert not any(seq.first_token_ns for seq in waiting)
        assert [short_tokens, *[(await drain(seq))[0] for seq in waiting]] == [alone[2], *alone[:2]]
    finally:
        await engine.close()


async def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(
        decoder: OnnxDecoder, built_model: Path, prompts: list[list[int]]) -> None:
    long_prompt = chat_prompt(built_model, SYSTEM, "Summarise your instructions.")
    whole = Engine(decoder, EOS, 8192, EngineLimits(prefill_chunk=4096, prefix_cache_bytes=0))
    chunked = Engine(decoder, EOS, 8192, EngineLimits(prefill_chunk=64, prefix_cache_bytes=0))
    whole.start()
    chunked.start()
    try:
        expected, _ = await drain(whole.submit(request(long_prompt, max_tokens=8)))
        running = chunked.submit(request(prompts[2], max_tokens=200))
        assert isinstance(await running.events.get(), TokenEvent)
        joiner = chunked.submit(request(long_prompt, max_tokens=8))
        first = await joiner.events.get()
        # While the joiner's prompt went in 64 tokens a step, the running stream kept getting tokens.
        assert running.events.qsize() >= len(long_prompt) // 64 - 2
        assert isinstance(first, TokenEvent)
        rest, _ = await drain(joiner)
        assert [first.sampled.token_id, *rest] == expected
        chunked.cancel(running)
        await drain(running)
    finally:
        await whole.close()
        await chunked.close()


async def test_device_route_answers_like_the_host_route(tiny_decoder: OnnxDecoder, tiny_model: Path,
                                                        prompts: list[list[int]]) -> None:
    """CUDA's route (DeviceSlotCache), here over CPU memory, under the traffic that moves rows most: long prompts in
    chunks, a prefix-cache hit, seeded sampling, sequences joining and leaving. Every answer equals the host
    route's with the same requests sent one at a time."""
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    plan: Plan = [
        (chat_prompt(tiny_model, SYSTEM, "Summarise your instructions."), 6, {}),
        (prompts[0], 9, seeded),
        (prompts[1], 3, {}),
        (chat_prompt(tiny_model, SYSTEM, "Who are you?"), 5, {}),  # its system prompt: a prefix hit
        (prompts[2], 12, {}),
        (chat_prompt(tiny_model, SYSTEM, "Why?"), 4, seeded),  # seeded: computed alone, in pieces
    ]
    limits = EngineLimits(max_active=3, prefill_chunk=64)
    alone = await answers_one_at_a_time(tiny_decoder, plan, limits)
    device = engine_on_route(tiny_decoder, limits, kv_on_device=True)
    try:
        await drain(device.submit(request(plan[0][0], max_tokens=1)))  # the system prompt, cached for plan[3]
        together = await asyncio.gather(*(drain(device.submit(request(p, max_tokens=n, **kw))) for p, n, kw in plan))
        assert device.prefix_cache.stats.hits >= 2
    finally:
        await device.close()
    assert [tokens for tokens, _ in together] == alone


async def test_a_fixed_length_device_cache_keeps_one_shape_and_answers_like_the_host_route(
        tiny_decoder: OnnxDecoder, tiny_model: Path, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's device cache holds the whole context from the start: every decode run binds the same shapes (all
    rows, the full length, total_sequence_length the capacity, so CUDA's attention splits each row the same way
    whatever the others' lengths), including while long prompts join and leave. Over CPU memory, its answers are the
    host route's token for token."""
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 5}
    plan: Plan = [
        (chat_prompt(tiny_model, SYSTEM, "Summarise your instructions."), 6, {}),  # ~400 tokens
        (prompts[0], 9, seeded),
        (prompts[1], 14, {}),
        (chat_prompt(tiny_model, SYSTEM, "Who are you?"), 5, seeded),
        (prompts[2], 12, {}),
    ]
    limits = EngineLimits(max_active=3, prefill_chunk=64)
    alone = await answers_one_at_a_time(tiny_decoder, plan, limits)
    totals: list[int] = []
    real_decode = tiny_decoder.decode

    def recording_decode(input_ids: np.ndarray, seqlens_k: np.ndarray, cache: Any) -> np.ndarray:
        _, logits = cache.binding()
        totals.append(cache.total_length)
        assert logits.shape[0] == 3  # every run binds all rows
        return real_decode(input_ids, seqlens_k, cache)

    monkeypatch.setattr(tiny_decoder, "decode", recording_decode)
    device = engine_on_route(tiny_decoder, limits, kv_on_device=True, context_length=1024, fixed_length=True)
    try:
        assert device._slots.length_capacity == 1024
        together = await asyncio.gather(*(drain(device.submit(request(p, max_tokens=n, **kw))) for p, n, kw in plan))
        assert device._slots.length_capacity == 1024
    finally:
        await device.close()
    assert [tokens for tokens, _ in together] == alone
    assert len(totals) > 10 and set(totals) == {1024}


def test_a_decode_total_length_below_the_rows_is_refused() -> None:
    from services.model.graph import step_inputs

    ids, seqlens = np.zeros((2, 1), dtype=np.int64), np.asarray([5, 9])
    assert int(step_inputs(ids, seqlens, np.arange(2))["total_sequence_length"]) == 10
    assert int(step_inputs(ids, seqlens, np.arange(2), total_length=128)["total_sequence_length"]) == 128
    with pytest.raises(ValueError, match="below the rows"):
        step_inputs(ids, seqlens, np.arange(2), total_length=9)


async def test_device_route_under_random_traffic(tiny_decoder: OnnxDecoder, tiny_model: Path) -> None:
    """Seeded random traffic on CUDA's route over CPU memory: prompts of 15 to ~330 tokens (the cache's capacity
    grows to hold them, its rows copied on the device), a shared prefix, seeded and greedy requests arriving at
    random moments. Every answer equals the host route's for the same request sent alone."""
    import random

    rng = random.Random(4)
    words = "the quick brown fox jumps over a lazy dog while engineers debate caches and tokens".split()
    shared = chat_prompt(tiny_model, SYSTEM, "Start.")

    def prompt() -> list[int]:
        if rng.random() < 0.25:
            return shared + [28] * rng.randint(1, 5)
        text = " ".join(rng.choice(words) for _ in range(rng.choice([5, 40, 300])))
        return chat_prompt(tiny_model, "", text)

    plan: Plan = [(prompt(), rng.randint(1, 30), {"temperature": 0.9, "top_p": 0.9, "seed": rng.randint(1, 99)}
                   if rng.random() < 0.4 else {}) for _ in range(7)]
    delays = [rng.random() * 0.05 for _ in plan]  # within a few of the tiny model's steps: they overlap
    limits = EngineLimits(max_active=5, prefill_chunk=96)
    alone = await answers_one_at_a_time(tiny_decoder, plan, limits)
    device = engine_on_route(tiny_decoder, limits, kv_on_device=True)

    async def later(delay: float, prompt: list[int], max_tokens: int, kw: dict[str, float]) -> list[int]:
        await asyncio.sleep(delay)
        return (await drain(device.submit(request(prompt, max_tokens=max_tokens, **kw))))[0]

    capacities: list[int] = []

    async def watch() -> None:
        while True:
            capacities.append(device._slots.length_capacity)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        together = await asyncio.gather(*(later(d, p, n, kw) for d, (p, n, kw) in zip(delays, plan, strict=True)))
    finally:
        watcher.cancel()
        await device.close()
    assert max(capacities) >= 384 and device.prefix_cache.stats.hits >= 1, (capacities, device.prefix_cache.stats)
    assert together == alone


@pytest.mark.parametrize("config", [SamplingConfig(temperature=1e-38, seed=1),
                                    SamplingConfig(temperature=1.4e-45, top_p=0.5, seed=2),
                                    SamplingConfig(repetition_penalty=1.4e-45),
                                    SamplingConfig(temperature=0.7, repetition_penalty=1.4e-45, top_k=5, seed=3)])
def test_extreme_but_valid_sampling_values_give_finite_logprobs(config: SamplingConfig) -> None:
    """The smallest temperatures and penalties the contract allows behave like their limits (greedy; a seen token
    chosen: a penalty below 1 favours repeats), never NaN."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32) * 5
    seen = list(range(0, 1000, 7))
    sampler = Sampler(config, seen, top_logprobs=3)
    sampled = sampler.sample(logits)
    assert np.isfinite(sampled.logprob) and sampled.logprob <= 0
    assert all(not np.isnan(logprob) and logprob <= 0 for _, logprob in sampled.top)
    if config.temperature < 1e-30 and config.repetition_penalty == 1.0:
        assert sampled.token_id == int(np.argmax(logits))  # the limit of a vanishing temperature is greedy
    if config.repetition_penalty < 1e-30:
        assert sampled.token_id in seen


def test_a_device_cache_that_does_not_fit_says_what_to_lower(decoder: OnnxDecoder,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the decode cache is allocated whole when the engine starts; when it does not fit, the replica
    stops with one line naming its size and the flag to lower (ONNX Runtime's own error is a bare RuntimeError)."""
    from lmesh.registry.v1 import registry_pb2

    from services.common.errors import FailedPrecondition
    from services.inference.loader import _engine

    def out_of_memory(self: DeviceSlotCache, capacity: int) -> None:
        raise RuntimeError("Failed to allocate memory for requested buffer of size 3019898880")

    monkeypatch.setattr(DeviceSlotCache, "_reallocate", out_of_memory)
    version = registry_pb2.ModelVersion(name="smollm2", version="1-fp16", context_length=8192)
    decoder.kv_on_device, decoder.kv_fixed_length = True, True
    try:
        with pytest.raises(FailedPrecondition) as refused:
            _engine(decoder, version, EngineLimits(max_active=16))
    finally:
        decoder.kv_on_device = decoder.kv_fixed_length = False
    message = str(refused.value)
    assert "16 rows of 8192 positions" in message and "GiB" in message and "lower --max-active" in message
    assert "Failed to allocate" in message

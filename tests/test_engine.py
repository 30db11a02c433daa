"""The inference engine on the real model: batching, determinism, admission, deadlines, cancel, sampling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

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
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import Sampler, SamplingConfig

EOS = frozenset({2})
# ChatML prompts of different lengths, tokenized once with the model's tokenizer (see _prompt).
QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "Explain in one long sentence why the sky is blue during the day."]


@pytest.fixture(scope="module")
def decoder(built_model: Path) -> OnnxDecoder:
    return OnnxDecoder(built_model / "model.onnx")


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


async def test_same_seed_gives_same_tokens_also_batched(engine: Engine, prompts: list[list[int]]) -> None:
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}
    first, _ = await drain(engine.submit(request(prompts[1], max_tokens=16, **sampled)))
    batched = await asyncio.gather(drain(engine.submit(request(prompts[1], max_tokens=16, **sampled))),
                                   drain(engine.submit(request(prompts[0], max_tokens=16, temperature=1.0))))
    assert batched[0][0] == first
    other, _ = await drain(engine.submit(request(prompts[1], max_tokens=16, **{**sampled, "seed": 99})))
    assert other != first


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
    engine = Engine(decoder, EOS, 8192, EngineLimits(max_active=1, max_queue=1))
    # Not started: nothing leaves the queue, so the second waiting request is over the bound.
    engine.submit(request(prompts[0]))
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as caught:
        engine.submit(request(prompts[0]))
    assert time.monotonic() - started < 0.1
    assert caught.value.retry_after_s is not None


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
    ("top_k", {"top_k": -1}), ("top_k", {"top_k": 10**6}), ("repetition_penalty", {"repetition_penalty": 3.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
])
def test_every_sampling_parameter_is_validated(field: str, kwargs: dict[str, float]) -> None:
    values = {"temperature": 0.0, "top_p": 0.0, "top_k": 0, "seed": 0, "repetition_penalty": 0.0, **kwargs}
    with pytest.raises(InvalidArgument) as caught:
        SamplingConfig.validated(vocab_size=49152, **values)  # type: ignore[arg-type]
    assert field in caught.value.message


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

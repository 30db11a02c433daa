"""Where a batched decode step's time goes, without gRPC: a bare loop over the engine's own KV cache (one ONNX
Runtime run and an argmax per step) against the lmesh engine, for N equal streams, in this process.

The difference is the engine's own cost per step (sampling with logprobs, bookkeeping, handing tokens to the
event loop). Compare both with `python -m bench.gemm_floor` (the matrix products alone) and with `make bench`'s
ITL (the same step with gRPC and clients sharing the cores).

It also times whole batches as `bench.mesh_tax` sends them: `make bench`'s 16 prompts submitted at once to an
engine whose prefix cache already holds them, N x T tokens over the wall time from submission to the last token,
as a share of `bench.ceiling`'s bound (T - 1 bare steps): what the engine alone reaches, before gRPC and clients.

usage: python -m bench.engine_step [--model-dir DIR] [--streams 16] [--tokens 64] [--batches 4]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from bench.prompts import prompt_ids
from services.common.config import lmesh_cache
from services.inference.engine import Engine, EngineLimits, GenerationRequest, Sequence, TokenEvent
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import SamplingConfig
from services.model.reference import chat_prompt_ids


def bare_loop_step_ms(decoder: OnnxDecoder, prompts: list[list[int]], tokens: int) -> float:
    cache = decoder.slot_cache(len(prompts), 8192)
    last = []
    for row, prompt in enumerate(prompts):
        out = decoder.run(np.asarray([prompt]), np.asarray([len(prompt) - 1]), np.asarray([len(prompt) - 1]),
                          decoder.empty_past(1))
        cache.reserve(row + 1, max(len(p) for p in prompts) + tokens + 1)
        cache.put(row, out.presents, len(prompt))
        last.append(int(out.logits[0].argmax()))
    lengths, inputs = np.asarray([len(p) for p in prompts]), np.asarray(last)
    began = time.perf_counter()
    for _ in range(tokens - 1):
        logits = decoder.decode(inputs[:, None].astype(np.int64), lengths, cache)
        inputs, lengths = logits.argmax(axis=1), lengths + 1
    return (time.perf_counter() - began) / (tokens - 1) * 1e3


async def engine_step_ms(decoder: OnnxDecoder, prompts: list[list[int]], tokens: int) -> float:
    """Decode-phase time per step: from the last stream's first token to the end, over the tokens after it."""
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(max_active=len(prompts), prefix_cache_bytes=0))
    engine.start()

    async def first_and_last(seq: Sequence) -> tuple[float, float]:
        first = 0.0
        while isinstance(await seq.events.get(), TokenEvent):
            first = first or time.perf_counter()
        return first, time.perf_counter()

    try:
        seqs = [engine.submit(GenerationRequest(prompt_ids=p, max_tokens=tokens, sampling=SamplingConfig()))
                for p in prompts]
        spans = await asyncio.gather(*(first_and_last(s) for s in seqs))
        return (max(end for _, end in spans) - max(first for first, _ in spans)) / (tokens - 1) * 1e3
    finally:
        await engine.close()


async def warm_batch_rates(decoder: OnnxDecoder, prompts: list[list[int]], tokens: int, batches: int) -> list[float]:
    """tokens/s of each batch of `prompts` submitted at once, after one batch that puts them in the prefix cache."""
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(max_active=len(prompts)))
    engine.start()

    async def made(seq: Sequence) -> int:
        count = 0
        while isinstance(await seq.events.get(), TokenEvent):
            count += 1
        return count

    rates = []
    try:
        for batch in range(batches + 1):
            began = time.perf_counter()
            seqs = [engine.submit(GenerationRequest(prompt_ids=p, max_tokens=tokens, sampling=SamplingConfig()))
                    for p in prompts]
            count = sum(await asyncio.gather(*(made(s) for s in seqs)))
            if batch:  # the first one filled the prefix cache
                rates.append(count / (time.perf_counter() - began))
    finally:
        await engine.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    decoder = OnnxDecoder(args.model_dir / "model.onnx")
    prompts = [chat_prompt_ids(args.model_dir, f"Tell me a long story about brave cat number {i} who sails the seas.")
               for i in range(args.streams)]
    bare_loop_step_ms(decoder, prompts, 8)  # warm-up
    asyncio.run(engine_step_ms(decoder, prompts, 8))
    bare = [bare_loop_step_ms(decoder, prompts, args.tokens) for _ in range(2)]
    engine = [asyncio.run(engine_step_ms(decoder, prompts, args.tokens)) for _ in range(2)]
    print(f"{args.streams} streams, {args.tokens} tokens each, ms per decode step (two runs each)")
    print(f"bare ORT loop over the engine's cache: {bare[0]:.1f}, {bare[1]:.1f}")
    print(f"lmesh engine, no gRPC:                {engine[0]:.1f}, {engine[1]:.1f}")
    bench_prompts = prompt_ids(args.model_dir)[:args.streams]
    ceiling = len(bench_prompts) * args.tokens / (bare_loop_step_ms(decoder, bench_prompts, args.tokens)
                                                   * (args.tokens - 1) / 1e3)
    rates = asyncio.run(warm_batch_rates(decoder, bench_prompts, args.tokens, args.batches))
    print(f"whole batches of make bench's prompts, prefix cache warm: "
          f"{', '.join(f'{r:.0f}' for r in rates)} tok/s = {', '.join(f'{r / ceiling:.2f}' for r in rates)} "
          f"of bench.ceiling's {ceiling:.0f} tok/s")


if __name__ == "__main__":
    main()

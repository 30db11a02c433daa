"""GPU check for the inference engine: CUDA with the KV cache on the device vs CPU, and what CUDA changes.

Runs on a machine with onnxruntime-gpu and an NVIDIA GPU, on the fp16 variant (whose attention has CUDA kernels):
- kernels: the decoder's three kinds of run on CUDA against the CPU's (a right-padded batch of prompts, a prompt
  chunk over a past, in-place decode steps on the device cache), where the KV lives, and the bare decode step;
- reference: a plain ONNX Runtime greedy loop on CUDA (numpy feeds, the past copied in and out every step);
- engine: the real engine (continuous batching, one ONNX Runtime run per step) for 1 and 16 streams, forcing the
  same number of tokens per stream; CUDA's greedy tokens against the CPU's, and each of 16 batched streams
  against the same prompt run alone;
- rows: one decode row's logits alone against the same row among others (growing cache against fixed length),
  and a prompt's alone against in a shared run, compared bit for bit;
- repeat: the same decode (and prompt) run from the same state, 20 times, also after other prompt and decode runs
  and over other garbage past the rows' lengths: how many distinct results, bit for bit;
- rows_steps: one sequence decoding 64 steps alone against in row 7 among 15 others, the same tokens fed;
- trace: every row of logits each seeded sampled stream's sampler sees, the same requests alone twice and batched,
  and the first step where they differ;
- invariance: seeded requests alone against the same requests batched with others (a long prompt joining midway,
  the prefix cache on and holding their system prompt), on the fixed-length cache and on a growing one;
- mixed: 48 requests of 16-128 tokens with 16 in flight (sequences join and leave the device rows all the time);
- prefix: a prefix-cache hit on CUDA gives the miss's tokens, sooner;
- fp32: the fp32 graph asked for on CUDA runs on the CPU instead (CUDA has no float32 GroupQueryAttention).
Each section's result is printed and written to --out as it completes; a failing section records its error.
usage: python -m bench.gpu_check --model-dir DIR [--tokens 64] [--out FILE] [--only SECTION,...] [--dry-run]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.engine import (
    Engine,
    EngineLimits,
    FinishEvent,
    GenerationRequest,
    Sequence,
    TokenEvent,
)
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import SamplingConfig

QUESTIONS = [
    "What is the capital of France?", "Write a poem about the sea.", "Explain photosynthesis simply.",
    "List five fruits and their colors.", "How do airplanes fly?", "Tell me a story about a brave cat.",
    "What is machine learning?", "Describe a sunset over the mountains.", "Why is the sky blue?",
    "Give me three tips for studying.", "What causes rain?", "How does a computer work?",
    "Describe the water cycle.", "What is gravity?", "Write a short letter to a friend.", "How do bees make honey?",
]
SYSTEM = ("You are a careful assistant for an engineering team. Answer in plain English, keep answers short, "
          "cite the relevant standard when there is one, say when you are unsure, and never invent numbers. ") * 4
CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def chat(tokenizer: Any, question: str, system: str = "") -> list[int]:
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    text += f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def prompts(model_dir: Path, system: str = "") -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [chat(tokenizer, q, system) for q in QUESTIONS]


async def collect(seq: Sequence) -> list[int]:
    out: list[int] = []
    while True:
        event = await seq.events.get()
        if isinstance(event, TokenEvent):
            out.append(event.sampled.token_id)
        elif isinstance(event, FinishEvent):
            return out
        else:
            raise RuntimeError(str(event))


def request(prompt: list[int], tokens: int, sampling: SamplingConfig | None = None) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=tokens, sampling=sampling or SamplingConfig())


async def generate(engine: Engine, batch: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    seqs = [engine.submit(request(p, tokens)) for p in batch]
    outputs = [await collect(seq) for seq in seqs]
    return outputs, time.perf_counter() - started


@contextlib.contextmanager
def cache_length(decoder: OnnxDecoder, fixed: bool) -> Iterator[None]:
    """Device caches made inside hold the whole context from the start (the default) or grow with their rows."""
    saved = decoder.kv_fixed_length
    decoder.kv_fixed_length = saved and fixed
    try:
        yield
    finally:
        decoder.kv_fixed_length = saved


def device_cache(decoder: OnnxDecoder, fixed: bool) -> Any:
    with cache_length(decoder, fixed):
        return decoder.slot_cache(16, 8192)


def new_engine(decoder: OnnxDecoder, prefix_cache_bytes: int = 0, growing: bool = False) -> Engine:
    """growing: a device cache that grows with its rows (the route before fixed-length buffers)."""
    with cache_length(decoder, not growing):
        # No end-of-turn ids: every stream generates exactly the tokens asked for, so runs are comparable.
        return Engine(decoder, frozenset(), 8192, EngineLimits(max_active=16, prefix_cache_bytes=prefix_cache_bytes))


def shared_prompt_run(decoder: OnnxDecoder, batch: list[list[int]]) -> Any:
    """One run of several prompts, right-padded to the longest (as the engine runs new prompts together)."""
    width = max(len(p) for p in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    for row, p in enumerate(batch):
        ids[row, : len(p)] = p
    lengths = np.asarray([len(p) for p in batch])
    return decoder.run(ids, lengths - 1, np.arange(len(batch)) * width + lengths - 1, decoder.empty_past(len(batch)))


def prompt_kv(decoder: OnnxDecoder, prompt: list[int]) -> Any:
    """One prompt's run of its own (logits at its last position, its KV)."""
    return decoder.run(np.asarray([prompt]), np.asarray([len(prompt) - 1]), np.asarray([len(prompt) - 1]),
                       decoder.empty_past())


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean length of the common greedy prefix, as a fraction of the generated length."""
    shares = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        shares.append(n / max(1, len(x)))
    return round(sum(shares) / len(shares), 4)


# ---- sections -------------------------------------------------------------------------------------------------


def kernels(cpu: OnnxDecoder, cuda: OnnxDecoder, all_prompts: list[list[int]]) -> dict[str, Any]:
    """CUDA's logits against the CPU's for each kind of run, and the bare decode step's time."""
    result: dict[str, Any] = {"providers": cuda.providers}
    batch = all_prompts[:3]
    width = max(len(p) for p in batch)
    lengths = np.asarray([len(p) for p in batch])
    outs = {name: shared_prompt_run(d, batch) for name, d in (("cpu", cpu), ("cuda", cuda))}
    result["prompt_batch"] = compare(outs["cpu"].logits, outs["cuda"].logits)

    # A second chunk of the first prompt over its own first half.
    prompt = all_prompts[0]
    half = len(prompt) // 2
    chunk_logits = {}
    for name, d in (("cpu", cpu), ("cuda", cuda)):
        first = d.run(np.asarray([prompt[:half]]), np.asarray([half - 1]), np.asarray([half - 1]), d.empty_past())
        second = d.run(np.asarray([prompt[half:]]), np.asarray([len(prompt) - 1]),
                       np.asarray([len(prompt) - half - 1]), first.presents)
        chunk_logits[name] = second.logits
    result["chunk_over_past"] = compare(chunk_logits["cpu"], chunk_logits["cuda"])

    # Decode steps in place: the three prompts' KV in rows of one SlotCache, greedy tokens fed back.
    decode_logits: dict[str, list[np.ndarray]] = {}
    for name, d in (("cpu", cpu), ("cuda", cuda)):
        out = outs[name]
        cache = d.slot_cache(16, 8192)
        cache.reserve(len(batch), width + 16)
        for row, p in enumerate(batch):
            cache.put(row, [t[row:row + 1] for t in out.presents], len(p))
        tokens = np.argmax(outs["cpu"].logits, axis=1)  # the same inputs on both
        past = lengths.copy()
        steps = []
        for _ in range(8):
            logits = d.decode(tokens[:, None], past, cache).copy()
            steps.append(logits)
            past = past + 1
            tokens = np.argmax(steps[-1] if name == "cpu" else decode_logits["cpu"][len(steps) - 1], axis=1)
        decode_logits[name] = steps
        if name == "cuda":
            result["kv_cache"] = f"{type(cache).__name__} on {d.kv_device}"
    result["decode_in_place"] = compare(np.concatenate(decode_logits["cpu"]), np.concatenate(decode_logits["cuda"]))

    for name, d in (("cpu", cpu), ("cuda", cuda)):
        for rows in (1, 16):
            result[f"bare_decode_ms_{name}_{rows}_rows"] = bare_decode_ms(d, rows)
    return result


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    return {"max_abs_diff": round(float(np.max(np.abs(a32 - b32))), 4),
            "argmax_equal": f"{int(np.sum(a32.argmax(-1) == b32.argmax(-1)))}/{a32.shape[0]}"}


def bare_decode_ms(decoder: OnnxDecoder, rows: int, past: int = 100, steps: int = 40) -> float:
    """Median time of one decode run over `rows` rows of `past` positions (no engine around it)."""
    cache = decoder.slot_cache(16, 8192)
    cache.reserve(rows, past + steps + 1)
    kv = [np.zeros((1, decoder.num_kv_heads, past, decoder.head_dim), dtype=decoder.kv_dtype)
          for _ in decoder.past_names]
    for row in range(rows):
        cache.put(row, kv, past)
    ids = np.full((rows, 1), 42, dtype=np.int64)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        decoder.decode(ids, np.full(rows, past + step), cache)
        times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times[5:])), 3)


async def engine_run(decoder: OnnxDecoder, all_prompts: list[list[int]], tokens: int,
                     each_alone: bool = False, growing: bool = False) -> dict[str, Any]:
    engine = new_engine(decoder, growing=growing)
    engine.start()
    try:
        await generate(engine, all_prompts[:2], 8)  # warm-up
        single, single_s = await generate(engine, all_prompts[:1], tokens)
        batch, batch_s = await generate(engine, all_prompts, tokens)
        result: dict[str, Any] = {"single_tok_s": round(tokens / single_s, 1),
                                  "batch16_tok_s": round(16 * tokens / batch_s, 1), "batch_tokens": batch}
        if each_alone:
            alone = [(await generate(engine, [p], tokens))[0][0] for p in all_prompts]
            result["batched_equals_alone"] = f"{sum(a == b for a, b in zip(alone, batch, strict=True))}/16"
            result["batched_vs_alone_agreement"] = agreement(batch, alone)
        else:
            result["batched_equals_alone"] = "row 0: " + str(batch[0] == single[0])
    finally:
        await engine.close()
    return result


def mixed_requests(all_prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(7)
    return [(all_prompts[i % 16], int(rng.integers(16, 129))) for i in range(48)]


async def mixed_run(decoder: OnnxDecoder, work: list[tuple[list[int], int]], growing: bool = False) -> dict[str, Any]:
    """48 requests, 16 in flight: each finished one is replaced at once (sequences join and leave every few steps)."""
    engine = new_engine(decoder, growing=growing)
    engine.start()
    try:
        await generate(engine, [work[0][0]], 4)
        limit = asyncio.Semaphore(16)

        async def one(prompt: list[int], tokens: int) -> list[int]:
            async with limit:
                return await collect(engine.submit(request(prompt, tokens)))

        started = time.perf_counter()
        outputs = await asyncio.gather(*(one(p, n) for p, n in work))
        elapsed = time.perf_counter() - started
    finally:
        await engine.close()
    return {"tok_s": round(sum(n for _, n in work) / elapsed, 1), "tokens": list(outputs)}


async def prefix(decoder: OnnxDecoder, model_dir: Path, tokens: int) -> dict[str, Any]:
    """Time to first token of a prompt whose system prompt is cached (hit) against the same prompt uncached."""
    with_system = prompts(model_dir, SYSTEM)
    cold, warm = new_engine(decoder), new_engine(decoder, PREFIX_CACHE_BYTES)
    cold.start()
    warm.start()
    try:
        ttft: dict[str, float] = {}
        outs: dict[str, list[int]] = {}
        cached = 0
        # The miss runs twice (its first run of this prompt length pays for new allocations); the hit follows a
        # request that cached the system prompt.
        for name, engine, prompt in (("first", cold, with_system[1]), ("miss", cold, with_system[1]),
                                     ("fill", warm, with_system[0]), ("hit", warm, with_system[1])):
            seq = engine.submit(request(prompt, tokens))
            outs[name] = await collect(seq)
            ttft[name] = (seq.first_token_ns - seq.enqueued_ns) / 1e6
            cached = seq.cached_tokens
    finally:
        await cold.close()
        await warm.close()
    return {"prompt_tokens": len(with_system[1]), "hit_cached_tokens": cached,
            "first_miss_ttft_ms": round(ttft["first"], 2), "miss_ttft_ms": round(ttft["miss"], 2),
            "hit_ttft_ms": round(ttft["hit"], 2), "hit_equals_miss": outs["hit"] == outs["miss"]}


def rows_check(cuda: OnnxDecoder, all_prompts: list[list[int]], long_prompt: list[int]) -> dict[str, Any]:
    """Bit-for-bit: one decode row alone against the same row with 15 others (a long one among them), on a cache
    that grows to the rows' length (total_sequence_length their longest) and on one of fixed length; and a prompt's
    logits and KV from a run of its own against a run shared with other prompts."""
    result: dict[str, Any] = {}
    seqs = [all_prompts[0], *all_prompts[1:15], long_prompt]
    kvs = [prompt_kv(cuda, p) for p in seqs]
    for fixed in (False, True):
        logits = []
        for rows in (1, 16):
            cache = device_cache(cuda, fixed)
            lengths = np.asarray([len(p) for p in seqs[:rows]])
            cache.reserve(rows, int(lengths.max()) + 2)
            for row in range(rows):
                cache.put(row, kvs[row].presents, int(lengths[row]))
            ids = np.full((rows, 1), 42, dtype=np.int64)
            logits.append(cuda.decode(ids, lengths, cache)[0].copy())
            del cache
        name = "fixed_length" if fixed else "growing"
        result[f"decode_row_{name}_max_abs_diff"] = float(np.max(np.abs(logits[0] - logits[1])))
        result[f"decode_row_{name}_bitwise_equal"] = bool(np.array_equal(logits[0], logits[1]))
    group = all_prompts[:4]
    shared = shared_prompt_run(cuda, group)
    own = kvs[0]
    result["prompt_shared_run_logits_max_abs_diff"] = float(np.max(np.abs(shared.logits[0] - own.logits[0])))
    n = len(group[0])
    result["prompt_shared_run_kv_bitwise_equal"] = all(
        np.array_equal(a[0:1, :, :n], b[:, :, :n]) for a, b in zip(shared.presents, own.presents, strict=True))
    return result


def rows_steps(cuda: OnnxDecoder, all_prompts: list[list[int]], long_prompt: list[int],
               steps: int = 64) -> dict[str, Any]:
    """Bit-for-bit over many decode steps on the fixed-length cache: one sequence alone in row 0 against the same
    sequence in row 7 among 15 others (a long one among them) that decode along, the same tokens fed to it."""
    target = all_prompts[0]
    others = [*all_prompts[1:8], *all_prompts[8:15], long_prompt]
    order = [*others[:7], target, *others[7:]]
    kv = {id(p): prompt_kv(cuda, p).presents for p in order}
    traces = []
    for layout in ([target], order):
        cache = device_cache(cuda, True)
        for row, p in enumerate(layout):
            cache.put(row, kv[id(p)], len(p))
        lengths = np.asarray([len(p) for p in layout])
        where = layout.index(target)
        rows = []
        for step in range(steps):
            ids = np.full((len(layout), 1), 42, dtype=np.int64)
            ids[where, 0] = 100 + step
            rows.append(cuda.decode(ids, lengths, cache)[where].copy())
            lengths = lengths + 1
        traces.append(rows)
        del cache
    first = next((i for i, (a, b) in enumerate(zip(*traces, strict=True)) if not np.array_equal(a, b)), None)
    return {"steps": steps, "first_differing_step": first,
            "max_abs_diff": float(max(np.max(np.abs(a - b)) for a, b in zip(*traces, strict=True)))}


def repeat(cuda: OnnxDecoder, all_prompts: list[list[int]], long_prompt: list[int], trials: int = 20) -> dict[str, Any]:
    """Run to run on identical inputs: one decode run of 16 rows from the same restored cache state, and one prompt
    run, `trials` times each; how many distinct logits (and written KV) come out."""
    import hashlib

    def digest(*arrays: np.ndarray) -> str:
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    order = [*all_prompts[:15], long_prompt]
    kvs = [prompt_kv(cuda, p).presents
           for p in order]
    cache = device_cache(cuda, True)
    lengths = np.asarray([len(p) for p in order])
    ids = np.arange(100, 116, dtype=np.int64)[:, None]
    decode_logits, decode_kv = set(), set()
    for _ in range(trials):
        for row, kv in enumerate(kvs):
            cache.put(row, kv, int(lengths[row]))
        logits = cuda.decode(ids, lengths, cache)
        decode_logits.add(digest(logits))
        decode_kv.add(digest(*cache.row(3, int(lengths[3]) + 1)))
    # The same, each trial's rows first filled with different garbage past their lengths (what leaving sequences
    # leave behind): only the rows' own positions may count.
    stale_logits = set()
    rng = np.random.default_rng(0)
    for _ in range(trials // 2):
        block = rng.standard_normal((1, cuda.num_kv_heads, 600, cuda.head_dim)).astype(cuda.kv_dtype)
        for row, kv in enumerate(kvs):
            cache.put(row, [block] * len(kv), 600)
            cache.put(row, kv, int(lengths[row]))
        stale_logits.add(digest(cuda.decode(ids, lengths, cache)))
    # The same, a prompt run of a different length before each decode (ONNX Runtime's arena holds other data).
    after_prompts = set()
    for trial in range(trials // 2):
        p = (all_prompts[trial % 15] * 8)[: 20 + 37 * trial]
        prompt_kv(cuda, p)
        for row, kv in enumerate(kvs):
            cache.put(row, kv, int(lengths[row]))
        after_prompts.add(digest(cuda.decode(ids, lengths, cache)))
    # The same, a decode run over other rows (other lengths, tokens) before each restored decode.
    after_decodes = set()
    for trial in range(trials // 2):
        for row, kv in enumerate(kvs[::-1]):
            cache.put(row, kv, int(lengths[::-1][row]))
        cuda.decode(ids + trial, lengths[::-1] + trial % 3, cache)
        for row, kv in enumerate(kvs):
            cache.put(row, kv, int(lengths[row]))
        after_decodes.add(digest(cuda.decode(ids, lengths, cache)))
    prompt = all_prompts[1] * 6
    prompt_logits = set()
    for _ in range(trials):
        out = cuda.run(np.asarray([prompt]), np.asarray([len(prompt) - 1]), np.arange(len(prompt)), cuda.empty_past())
        prompt_logits.add(digest(out.logits, *out.presents))
    return {"trials": trials, "distinct_decode_logits": len(decode_logits), "distinct_decode_kv": len(decode_kv),
            "distinct_decode_logits_over_garbage": len(stale_logits),
            "distinct_decode_logits_after_prompt_runs": len(after_prompts),
            "distinct_decode_logits_after_other_decodes": len(after_decodes),
            "distinct_prompt_outputs": len(prompt_logits)}


PREFIX_CACHE_BYTES = 256 * 1024 * 1024


async def in_company(engine: Engine, work: list[tuple[list[int], SamplingConfig]], all_prompts: list[list[int]],
                     long_prompt: list[int], tokens: int) -> list[tuple[list[int], Sequence]]:
    """The requests of `work` batched with 4 greedy ones, and a long prompt joining once the first has a token."""
    company = [engine.submit(request(p, tokens)) for p in all_prompts[12:16]]
    seqs = [engine.submit(request(p, tokens, c)) for p, c in work]
    first = await seqs[0].events.get()
    late = engine.submit(request(long_prompt, tokens))
    answers = [await collect(seq) for seq in seqs]
    assert isinstance(first, TokenEvent)
    answers[0] = [first.sampled.token_id, *answers[0]]
    for seq in (*company, late):
        await collect(seq)
    return list(zip(answers, seqs, strict=True))


async def invariance(decoder: OnnxDecoder, model_dir: Path, all_prompts: list[list[int]],
                     tokens: int, growing: bool = False) -> dict[str, Any]:
    """Seeded requests (8 sampled, 4 greedy) alone, then the same requests in a batch with greedy company and a long
    prompt that joins midway, with the prefix cache on and holding their system prompt: each stream's tokens must
    not change. growing: a device cache that grows with its rows (total_sequence_length their longest)."""
    long_prompt = prompts(model_dir, SYSTEM * 3)[0]
    with_system = prompts(model_dir, SYSTEM)
    settings = [SamplingConfig(temperature=0.8, top_p=0.9, seed=s) for s in range(1, 9)]
    settings += [SamplingConfig(seed=s) for s in range(9, 13)]
    work = [(with_system[i] if i % 2 else all_prompts[i], c) for i, c in enumerate(settings)]
    engine = new_engine(decoder, PREFIX_CACHE_BYTES, growing=growing)
    engine.warm()
    engine.start()
    try:
        await collect(engine.submit(request(with_system[15], 2)))  # the system prompt, cached
        alone = [await collect(engine.submit(request(p, tokens, c))) for p, c in work]
        batched = [tokens for tokens, _ in await in_company(engine, work, all_prompts, long_prompt, tokens)]
        hits = engine.prefix_cache.stats.hits
    finally:
        await engine.close()
    equal = [a == b for a, b in zip(alone, batched, strict=True)]
    return {"long_prompt_tokens": len(long_prompt), "prefix_cache_hits": hits,
            "seeded_sampled_batched_equals_alone": f"{sum(equal[:8])}/8",
            "seeded_greedy_batched_equals_alone": f"{sum(equal[8:])}/4",
            "agreement": agreement(batched, alone)}


async def trace(decoder: OnnxDecoder, model_dir: Path, all_prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    """Where seeded sampled streams part: every row of logits each one's sampler sees, alone twice and batched (as in
    `invariance`), compared bit for bit; the first step that differs, and by how much."""
    from services.inference import sampling

    long_prompt = prompts(model_dir, SYSTEM * 3)[0]
    with_system = prompts(model_dir, SYSTEM)
    settings = [SamplingConfig(temperature=0.8, top_p=0.9, seed=s) for s in range(1, 9)]
    work = [(with_system[i] if i % 2 else all_prompts[i], c) for i, c in enumerate(settings)]
    seen: dict[int, list[np.ndarray]] = {}
    samplers: list[Any] = []  # kept alive: a freed sampler's id could be reused by a later one
    real_sample = sampling.Sampler.sample

    def recording(self: Any, logits: np.ndarray, mask: np.ndarray | None = None) -> Any:
        if id(self) not in seen:
            samplers.append(self)
        seen.setdefault(id(self), []).append(np.array(logits, dtype=np.float32, copy=True))
        return real_sample(self, logits, mask)

    sampling.Sampler.sample = recording  # type: ignore[method-assign]
    engine = new_engine(decoder, PREFIX_CACHE_BYTES)
    engine.warm()
    engine.start()
    try:
        async def alone_pass() -> list[tuple[list[int], list[np.ndarray]]]:
            out = []
            for p, c in work:
                seq = engine.submit(request(p, tokens, c))
                out.append((await collect(seq), seen.get(id(seq.sampler), [])))
            return out

        first_pass, second_pass = await alone_pass(), await alone_pass()
        batched = [(t, seen.get(id(seq.sampler), []))
                   for t, seq in await in_company(engine, work, all_prompts, long_prompt, tokens)]
    finally:
        sampling.Sampler.sample = real_sample  # type: ignore[method-assign]
        await engine.close()

    def parting(a: tuple[list[int], list[np.ndarray]], b: tuple[list[int], list[np.ndarray]]) -> dict[str, Any]:
        for step, (x, y) in enumerate(zip(a[1], b[1], strict=False)):
            if not np.array_equal(x, y):
                return {"logits_differ_at_step": step, "max_abs_diff": float(np.max(np.abs(x - y))),
                        "tokens_equal": a[0] == b[0], "tokens_part_at": next(
                            (i for i, (u, v) in enumerate(zip(a[0], b[0], strict=False)) if u != v), None)}
        return {"logits_equal_steps": min(len(a[1]), len(b[1])), "tokens_equal": a[0] == b[0]}

    return {"prompt_lengths": str([len(p) for p, _ in work]),
            "alone_twice": {str(i): parting(a, b) for i, (a, b) in enumerate(zip(first_pass, second_pass,
                                                                                 strict=True))},
            "alone_vs_batched": {str(i): parting(a, b) for i, (a, b) in enumerate(zip(first_pass, batched,
                                                                                     strict=True))}}


def reference_loop(path: Path, providers: list[str], prompt: list[int], tokens: int) -> dict[str, Any]:
    """A plain greedy loop on one session: numpy feeds, the growing past copied in and out every step."""
    import onnxruntime as ort

    from services.model.manifest import ModelManifest
    from services.model.reference import greedy_with_session

    manifest = ModelManifest.load(path.parent, variant="fp16")
    session = ort.InferenceSession(str(path), providers=providers)
    greedy_with_session(session, manifest, prompt, 4, stop_on_eos=False)
    started = time.perf_counter()
    out = greedy_with_session(session, manifest, prompt, tokens, stop_on_eos=False)
    return {"providers": session.get_providers(), "single_tok_s": round(tokens / (time.perf_counter() - started), 1),
            "tokens": out}


async def fp32_on_cuda(model_dir: Path, providers: list[str], prompt: list[int], tokens: int,
                       cpu_tokens: list[int]) -> dict[str, Any]:
    decoder = OnnxDecoder(model_dir / "model.onnx", providers=providers)
    engine = new_engine(decoder)
    engine.start()
    try:
        await generate(engine, [prompt], 4)
        out, seconds = await generate(engine, [prompt], tokens)
    finally:
        await engine.close()
    return {"providers": decoder.providers, "single_tok_s": round(tokens / seconds, 1),
            "agreement_with_fp16_cpu": agreement(out, [cpu_tokens])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="JSON file updated after each section")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the CPU stands in for CUDA, its KV bound in separate 'device' buffers on the "
                             "host (checks this script and the binding route, not a GPU)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import onnxruntime as ort

    summary: dict[str, Any] = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers()}
    try:
        import torch

        summary["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # the GPU's name is a nicety
        summary["gpu"] = f"unknown ({exc})"
    model_dir: Path = args.model_dir
    questions = prompts(model_dir)
    path = model_dir / "model.fp16.onnx"

    def section(name: str, fn: Callable[[], Any]) -> Any:
        if args.only and name not in args.only.split(","):
            return {}
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:
            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {exc}"}
        shown = value
        if isinstance(value, dict):
            shown = {k: v for k, v in value.items() if not isinstance(v, list) or k == "providers"}
        summary[name] = {**shown, "seconds": round(time.perf_counter() - started, 1)} if isinstance(shown, dict) \
            else shown
        print(json.dumps({name: summary[name]}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(summary, indent=2))
        return value

    gpu_providers = CPU if args.dry_run else CUDA
    cpu = OnnxDecoder(path, providers=CPU)
    cuda = OnnxDecoder(path, providers=gpu_providers)
    if args.dry_run:
        cuda.kv_on_device = cuda.kv_fixed_length = True
    elif not cuda.on_gpu:
        raise SystemExit(f"CUDA did not start: the session runs on {cuda.providers}")
    tokens = args.tokens
    long_prompt = prompts(model_dir, SYSTEM * 3)[0]
    section("rows_cuda", lambda: rows_check(cuda, questions, long_prompt))
    section("invariance_cuda", lambda: asyncio.run(invariance(cuda, model_dir, questions, tokens)))
    section("invariance_cuda_growing",
            lambda: asyncio.run(invariance(cuda, model_dir, questions, tokens, growing=True)))
    section("repeat_cuda", lambda: repeat(cuda, questions, long_prompt))
    section("rows_steps_cuda", lambda: rows_steps(cuda, questions, long_prompt))
    section("trace_cuda", lambda: asyncio.run(trace(cuda, model_dir, questions, tokens)))
    section("kernels", lambda: kernels(cpu, cuda, questions))
    section("reference_loop_cuda", lambda: reference_loop(path, gpu_providers, questions[0], tokens))
    runs: dict[str, Any] = {}
    runs["cpu"] = section("engine_cpu", lambda: asyncio.run(engine_run(cpu, questions, tokens)))
    runs["cuda"] = section("engine_cuda", lambda: asyncio.run(engine_run(cuda, questions, tokens, each_alone=True)))
    section("engine_cuda_growing", lambda: asyncio.run(engine_run(cuda, questions, tokens, growing=True)))
    cpu_tokens = runs["cpu"].get("batch_tokens")
    if cpu_tokens and "batch_tokens" in runs.get("cuda", {}):
        summary["engine_cuda"]["greedy_agreement_with_cpu"] = agreement(runs["cuda"]["batch_tokens"], cpu_tokens)
    work = mixed_requests(questions)
    mixed_cpu = section("mixed_cpu", lambda: asyncio.run(mixed_run(cpu, work)))
    mixed_cuda = section("mixed_cuda", lambda: asyncio.run(mixed_run(cuda, work)))
    section("mixed_cuda_growing", lambda: asyncio.run(mixed_run(cuda, work, growing=True)))
    if "tokens" in mixed_cpu and "tokens" in mixed_cuda:
        summary["mixed_cuda"]["agreement_with_cpu"] = agreement(mixed_cuda["tokens"], mixed_cpu["tokens"])
        summary["mixed_cuda"]["speedup_over_cpu"] = round(mixed_cuda["tok_s"] / mixed_cpu["tok_s"], 2)
    section("prefix_cuda", lambda: asyncio.run(prefix(cuda, model_dir, tokens)))
    if cpu_tokens:
        section("fp32_asked_on_cuda", lambda: asyncio.run(fp32_on_cuda(model_dir, gpu_providers, questions[0], 16,
                                                                        cpu_tokens[0][:16])))
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

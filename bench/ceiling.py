"""The most tokens/s any server could make from this model on this machine at 16 equal streams, against
onnxruntime-genai's static batch of 16, all measured in this one process on `make bench`'s prompts.

Three measurements, each an upper bound on what scheduling can win:
1. The graph's own decode run at 16 rows: a bare ONNX Runtime loop over the engine's KV cache (one run and an
   argmax per step), next to genai's C++ loop over the same prompts. No server answers a step faster than the
   graph runs, so 16 x T tokens take at least (T - 1) such steps, even with every prompt already cached.
2. Speculation, the way to make more than one token per row per run and keep the answers exact; its cheapest
   form, prompt-lookup drafts (the n-gram drafting of vLLM and Hugging Face), replayed over the real greedy
   answers. It pays off only if the tokens it makes per row and run beat what verifying the drafts costs.
3. That cost: the matrix products of a run with 16 x (k + 1) rows against 16 rows (bench.gemm_floor). Attention
   and norms grow with the rows at least as fast, so the products' ratio flatters speculation. "Needed" is what
   a row would have to make per run for the target even if drafting cost nothing (a draft model costs runs too).

usage: python -m bench.ceiling [--model-dir DIR] [--tokens 64] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from bench.engine_step import bare_loop_step_ms
from bench.gemm_floor import products_seconds, products_session, weight_shapes
from bench.genai_build import ensure_genai_model
from bench.prompts import prompt_ids
from bench.worker import GenAI
from services.common.config import lmesh_cache
from services.inference.onnx_model import OnnxDecoder

TARGET = 1.5  # the goal: lmesh@16 >= 1.5x genai's static batch of 16


def lookup_draft(context: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting: the k tokens that followed the latest earlier match of the context's last n tokens
    (longest n first, n >= 1)."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def tokens_per_run(prompts: list[list[int]], answers: list[list[int]], k: int) -> float:
    """Tokens a row makes per verifying run with k drafts: the drafts the greedy answer agrees with, plus the
    model's own token after them."""
    runs = made = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        at = 0
        while at < len(answer):
            draft = lookup_draft(prompt + answer[:at], k)
            agreed = 0
            while agreed < len(draft) and at + agreed < len(answer) and draft[agreed] == answer[at + agreed]:
                agreed += 1
            at += agreed + 1
            runs += 1
        made += len(answer)
    return made / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    threads = int(os.environ.get("LMESH_ORT_THREADS", os.cpu_count() or 1))
    tokens = args.tokens
    prompts = prompt_ids(args.model_dir)
    streams = len(prompts)
    bench_dir = lmesh_cache() / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    genai_dir, _ = ensure_genai_model(args.model_dir, bench_dir, bench_dir / "genai-build.log")
    genai = GenAI(genai_dir, threads)
    decoder = OnnxDecoder(args.model_dir / "model.onnx", threads=threads)
    genai.generate(prompts, 8)  # warm-up: first runs at each shape
    bare_loop_step_ms(decoder, prompts, 8)

    genai_rates, genai_steps, bare_steps = [], [], []
    answers: list[list[int]] = []
    for _ in range(args.runs):  # interleaved, so drift on a noisy machine hits both alike
        result = genai.generate(prompts, tokens)
        answers = result["tokens"]
        genai_rates.append(sum(len(a) for a in answers) / result["wall_s"])
        genai_steps.append(float(np.median(result["itl_s"][0])) * 1e3)
        bare_steps.append(bare_loop_step_ms(decoder, prompts, tokens))
    peer = float(np.median(genai_rates))
    bare = min(bare_steps)
    ceiling = streams * tokens / ((tokens - 1) * bare / 1e3)

    # genai's rate is the median run; both step times are the fastest run, which can only raise the ceiling.
    print(f"{streams} equal streams of {tokens} tokens, {threads} threads, float32, {args.runs} runs each: "
          "genai tok/s the median, step times the fastest")
    print("| measured | value |")
    print("|---|--:|")
    print(f"| genai static batch of {streams}: tok/s (prompt run included, as in make bench) | {peer:.0f} |")
    print(f"| genai: decode step, ms | {min(genai_steps):.1f} |")
    print(f"| bare ORT loop over the engine's cache: decode step, ms | {bare:.1f} |")
    print(f"| ceiling: {streams} x {tokens} tokens in {tokens - 1} bare steps, prompts free, tok/s | {ceiling:.0f} |")
    print(f"| ceiling / genai | **{ceiling / peer:.2f}x** (target {TARGET}x) |")

    drafts = (1, 2, 3, 4)
    session, ks = products_session(weight_shapes(args.model_dir / "model.onnx"), threads)
    cost = products_seconds(session, ks, [streams * (k + 1) for k in (0, *drafts)])
    print("\nPrompt-lookup speculation over the same greedy answers")
    need = TARGET * peer / ceiling  # the speed-up over the ceiling that the target asks for
    print("| drafts per row | tokens per row per run | needed for the target | products' cost vs 1 token | speed-up |")
    print("|--:|--:|--:|--:|--:|")
    best = 0.0
    for k in drafts:
        made = tokens_per_run(prompts, answers, k)
        ratio = cost[streams * (k + 1)] / cost[streams]
        best = max(best, made / ratio)
        print(f"| {k} | {made:.2f} | {need * ratio:.2f} | {ratio:.2f} | {made / ratio:.2f}x |")
    verdict = "reachable" if max(1.0, best) * ceiling >= TARGET * peer else "out of reach"
    print(f"\n{TARGET}x genai = {TARGET * peer:.0f} tok/s; best bound here = {max(1.0, best) * ceiling:.0f} tok/s: "
          f"{verdict} on this machine at this precision")


if __name__ == "__main__":
    main()

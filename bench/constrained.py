"""What constrained decoding costs a batch: 16 concurrent streams all free against 16 with half of them constrained
to a JSON schema (a tool call's: an array of calls, each with a name enum, a string, an integer and a list), on the
engine in this process (no gRPC), greedy, every stream generating the same number of tokens.

The schema asks for 8 calls, longer than the tokens generated, so no constrained stream completes early: every arm
decodes 16 rows for the same number of steps, and the ratio of tokens/s is the constrained rows' whole cost (their
masks, the masked sampling, the matchers). A third arm computes the masks in the model thread before each run
instead of while the model runs, to show what the overlap is worth. Arms interleave, round after round.

usage: python -m bench.constrained [--model-dir DIR] [--streams 16] [--constrained 8] [--tokens 64] [--rounds 3]
The table goes to stdout, the numbers to bench/results/constrained.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import machine
from services.common.config import lmesh_cache
from services.inference.constrained import CompiledConstraint, ConstraintSpec, Grammars
from services.inference.engine import Engine, EngineLimits, GenerationRequest, Sequence, TokenEvent
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import SamplingConfig
from services.model.reference import chat_prompt_ids

TOOL_CALL = {
    "type": "object",
    "properties": {
        "tool": {"enum": ["search", "calculator", "weather", "calendar"]},
        "query": {"type": "string", "maxLength": 40},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["tool", "query", "limit", "tags"],
    "additionalProperties": False,
}
SCHEMA = {"type": "object", "properties": {"calls": {"type": "array", "items": TOOL_CALL, "minItems": 8,
                                                     "maxItems": 8}},
          "required": ["calls"], "additionalProperties": False}
FREE, MIXED, MIXED_INLINE = "all free", "half constrained", "half constrained, masks inline"
ARMS = (FREE, MIXED, MIXED_INLINE)


async def run_arm(decoder: OnnxDecoder, free_prompts: list[list[int]], json_prompts: list[list[int]],
                  constraint: CompiledConstraint | None, overlap: bool, tokens: int) -> dict[str, Any]:
    """One arm: its streams at once; tokens/s over the decode phase (from the last stream's first token on)."""
    prompts = free_prompts if constraint is None else free_prompts[:len(free_prompts) - len(json_prompts)]
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(max_active=len(free_prompts), prefix_cache_bytes=0))
    engine.overlap_masks = overlap
    # Each decode step's time in the model thread, for the steps that decode every stream: the median step is what
    # a shared machine's passing load moves least.
    full_steps: list[float] = []
    decode = engine._decode

    def timed_decode(seqs: list[Sequence]) -> Any:
        began = time.perf_counter()
        produced = decode(seqs)
        if len(seqs) == len(free_prompts):
            full_steps.append(time.perf_counter() - began)
        return produced

    engine._decode = timed_decode  # type: ignore[method-assign]
    engine.start()

    async def first_and_last(seq: Sequence) -> tuple[tuple[float, float], tuple[float, float], int]:
        """(wall, CPU) clocks at the stream's first token and at its end, and its token count."""
        first, count = (0.0, 0.0), 0
        while isinstance(await seq.events.get(), TokenEvent):
            first = first if count else (time.perf_counter(), time.process_time())
            count += 1
        return first, (time.perf_counter(), time.process_time()), count

    try:
        requests = [GenerationRequest(prompt_ids=p, max_tokens=tokens, sampling=SamplingConfig()) for p in prompts]
        if constraint is not None:
            requests += [GenerationRequest(prompt_ids=p, max_tokens=tokens, sampling=SamplingConfig(),
                                           constraint=constraint) for p in json_prompts]
        seqs = [engine.submit(r) for r in requests]
        spans = await asyncio.gather(*(first_and_last(s) for s in seqs))
    finally:
        await engine.close()
    began, ended = max(first for first, _, _ in spans), max(end for _, end, _ in spans)
    counts = [count for _, _, count in spans]
    # Every stream's tokens after the latest first token: one per step for each of them.
    decoded = sum(count - 1 for count in counts)
    return {"tokens": sum(counts), "decode_s": ended[0] - began[0], "tokens_per_s": decoded / (ended[0] - began[0]),
            # The process's CPU (every thread: ONNX Runtime's, llguidance's) per 1000 tokens: what the other load
            # of a shared machine moves much less than the wall clock.
            "cpu_s_per_1000_tokens": (ended[1] - began[1]) / decoded * 1000,
            "median_step_ms": statistics.median(full_steps) * 1e3,
            "fastest_step_ms": min(full_steps) * 1e3,
            "all_full_length": all(count == tokens for count in counts)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median tokens/s per arm, and each constrained arm's ratio to the free one (median of the per-round ratios:
    rounds interleave, so a round's arms saw the same machine)."""
    medians = {arm: statistics.median(r["tokens_per_s"] for r in arm_runs) for arm, arm_runs in runs.items()}
    ratios = {arm: statistics.median(r["tokens_per_s"] / free["tokens_per_s"]
                                     for r, free in zip(arm_runs, runs[FREE], strict=True))
              for arm, arm_runs in runs.items() if arm != FREE}
    summary: dict[str, Any] = {"tokens_per_s": medians, "ratio_to_free": ratios}
    if all("median_step_ms" in r for arm_runs in runs.values() for r in arm_runs):
        step = {arm: statistics.median(r["median_step_ms"] for r in arm_runs) for arm, arm_runs in runs.items()}
        # The free arm's step over the arm's, per round, then the median: tokens/s at the median step.
        summary["median_step_ms"] = step
        summary["step_ratio_to_free"] = {
            arm: statistics.median(free["median_step_ms"] / r["median_step_ms"]
                                   for r, free in zip(arm_runs, runs[FREE], strict=True))
            for arm, arm_runs in runs.items() if arm != FREE}
    if all("fastest_step_ms" in r for arm_runs in runs.values() for r in arm_runs):
        # Each arm's fastest step of all rounds: its cost when nothing else ran on the machine.
        fastest = {arm: min(r["fastest_step_ms"] for r in arm_runs) for arm, arm_runs in runs.items()}
        summary["fastest_step_ms"] = fastest
        summary["fastest_step_ratio_to_free"] = {arm: fastest[FREE] / v for arm, v in fastest.items() if arm != FREE}
    if all("cpu_s_per_1000_tokens" in r for arm_runs in runs.values() for r in arm_runs):
        cpu = {arm: statistics.median(r["cpu_s_per_1000_tokens"] for r in arm_runs) for arm, arm_runs in runs.items()}
        # CPU per token of the free arm over the arm's: a tokens/s ratio, had the process the cores to itself.
        summary["cpu_s_per_1000_tokens"] = cpu
        summary["cpu_ratio_to_free"] = {arm: cpu[FREE] / value for arm, value in cpu.items() if arm != FREE}
    return summary


def mask_us(grammars: Grammars, constraint: CompiledConstraint, vocab: int, rows: int, text: str) -> float:
    """Microseconds to compute `rows` masks at once, averaged over the tokens of `text` (a valid output)."""
    from services.inference.constrained import RowMasks

    masks = RowMasks(vocab, [])
    states = [constraint.start() for _ in range(rows)]
    tokens = grammars.tokenizer.tokenize_str(text)
    spent = 0.0
    for token in tokens:
        began = time.perf_counter()
        masks.compute(states)
        spent += time.perf_counter() - began
        for state in states:
            state.consume(token)
    return spent / len(tokens) * 1e6


def decoder_eos(model_dir: Path) -> list[int]:
    return list(json.loads((model_dir / "lmesh_model.json").read_text(encoding="utf-8"))["eos_token_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--constrained", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "constrained.json")
    args = parser.parse_args()
    decoder = OnnxDecoder(args.model_dir / "model.onnx")
    grammars = Grammars.from_tokenizer_json((args.model_dir / "tokenizer.json").read_text(encoding="utf-8"),
                                         decoder_eos(args.model_dir))
    constraint = grammars.compile(ConstraintSpec("json_schema", json.dumps(SCHEMA)))
    free_prompts = [chat_prompt_ids(args.model_dir, f"Tell me a long story about brave cat number {i}.")
                    for i in range(args.streams)]
    json_prompts = [chat_prompt_ids(args.model_dir, f"Plan 8 tool calls, as JSON, for trip number {i} to Paris.")
                    for i in range(args.constrained)]
    example = json.dumps({"calls": [{"tool": "search", "query": "hotels in Paris near the river", "limit": 5,
                                     "tags": ["hotel", "paris"]}] * 8}, indent=1)
    masks_us = mask_us(grammars, constraint, decoder.vocab_size, args.constrained, example)
    asyncio.run(run_arm(decoder, free_prompts, json_prompts, constraint, True, 8))  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for _ in range(args.rounds):
        for arm in ARMS:
            runs[arm].append(asyncio.run(run_arm(decoder, free_prompts, json_prompts,
                                                 None if arm == FREE else constraint, arm != MIXED_INLINE,
                                                 args.tokens)))
    summary = summarize(runs)
    print(f"{args.streams} streams ({args.constrained} constrained to a JSON schema in the mixed arms), "
          f"{args.tokens} tokens each, greedy, {args.rounds} interleaved rounds; {machine()}")
    print(f"masks of {args.constrained} rows at once: {masks_us:.0f} us per step (mean over a valid output)")
    for arm in ARMS:
        rates = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs[arm])
        ratio = summary["ratio_to_free"].get(arm)
        cpu = summary["cpu_s_per_1000_tokens"][arm]
        cpu_ratio = summary["cpu_ratio_to_free"].get(arm)
        print(f"{arm:32s} tokens/s {summary['tokens_per_s'][arm]:7.1f} (rounds: {rates})"
              + (f"  ratio to free {ratio:.3f}" if ratio is not None else "")
              + f"; CPU s/1000 tokens {cpu:.2f}" + (f" (ratio {cpu_ratio:.3f})" if cpu_ratio is not None else ""))
        steps = ", ".join(f"{r['median_step_ms']:.1f}" for r in runs[arm])
        step_ratio = summary["step_ratio_to_free"].get(arm)
        fastest_ratio = summary["fastest_step_ratio_to_free"].get(arm)
        print(f"{'':32s} median full step ms {summary['median_step_ms'][arm]:.1f} (rounds: {steps})"
              + (f"  ratio to free {step_ratio:.3f}" if step_ratio is not None else "")
              + f"; fastest step {summary['fastest_step_ms'][arm]:.1f} ms"
              + (f" (ratio {fastest_ratio:.3f})" if fastest_ratio is not None else ""))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "bench": "constrained", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"streams": args.streams, "constrained": args.constrained, "tokens": args.tokens,
                   "rounds": args.rounds, "machine": machine(), "schema": SCHEMA},
        "mask_us_per_step": round(masks_us, 1),
        "summary": {k: {arm: round(float(v), 4) for arm, v in d.items()} for k, d in summary.items()},
        "runs": {arm: [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in arm_runs]
                 for arm, arm_runs in runs.items()},
    }, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

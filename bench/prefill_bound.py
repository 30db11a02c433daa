"""`bench.ceiling` with the prompts counted: the most tokens/s any server running this graph could make from
`make bench`'s 16 prompts when they are new, as a share of the prompt-free ceiling.

The 16 x T tokens take (T - 1) bare decode steps (bench.engine_step's loop) plus the prompts' prefill, run the
fastest way ONNX Runtime allows, each timed as the fastest of several runs in this process:
  * every prompt in one batch from an empty cache;
  * the shared prefix (the system prompt) once, then each prompt's rest over it, one row at a time;
  * every rest in one batch over the shared prefix, which the CPU GroupQueryAttention kernel refuses ("batch_size
    must be 1 when sequence_length > 1 and past context is given"): reported as refused, or timed if a build
    accepts it.

usage: python -m bench.prefill_bound [--model-dir DIR] [--tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.engine_step import bare_loop_step_ms
from bench.prompts import prompt_ids
from services.common.config import lmesh_cache
from services.inference.onnx_model import OnnxDecoder


def fastest_s(run: Callable[[], object], runs: int) -> float:
    run()  # warm-up: the first run at a shape allocates
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return min(times)


def shared_prefix(prompts: list[list[int]]) -> int:
    length = 0
    while all(len(p) > length + 1 and p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_bound", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    decoder = OnnxDecoder(args.model_dir / "model.onnx")
    prompts = prompt_ids(args.model_dir)
    if len({len(p) for p in prompts}) != 1:
        raise SystemExit("the bench prompts must have one length")
    width, rows, prefix = len(prompts[0]), len(prompts), shared_prefix(prompts)

    def alone(ids: list[int], past: list[np.ndarray], past_len: int) -> object:
        return decoder.run(np.asarray([ids]), np.asarray([past_len + len(ids) - 1]), np.asarray([len(ids) - 1]),
                           past)

    def one_batch() -> object:
        return decoder.run(np.asarray(prompts), np.full(rows, width - 1), np.arange(rows) * width + width - 1,
                           decoder.empty_past(rows))

    def prefix_then_rests() -> object:
        past = alone(prompts[0][:prefix], decoder.empty_past(1), 0).presents  # type: ignore[attr-defined]
        return [alone(p[prefix:], past, prefix) for p in prompts]

    def rests_in_one_batch() -> object:
        past = alone(prompts[0][:prefix], decoder.empty_past(1), 0).presents  # type: ignore[attr-defined]
        rest = width - prefix
        return decoder.run(np.asarray([p[prefix:] for p in prompts]), np.full(rows, width - 1),
                           np.arange(rows) * rest + rest - 1, [np.repeat(kv, rows, axis=0) for kv in past])

    step_ms = min(bare_loop_step_ms(decoder, prompts, args.tokens) for _ in range(3))
    decode_s = (args.tokens - 1) * step_ms / 1e3
    tokens = rows * args.tokens
    print(f"{rows} prompts of {width} tokens ({prefix} shared), {args.tokens} tokens each; bare decode step "
          f"{step_ms:.1f} ms: prompt-free ceiling {tokens / decode_s:.0f} tok/s")
    print("| how the prompts run | prefill ms | best tok/s | share of the prompt-free ceiling |")
    print("| --- | --: | --: | --: |")
    for name, run in (("one batch from an empty cache", one_batch),
                      ("the shared prefix once, then each rest over it, one row at a time", prefix_then_rests),
                      ("every rest in one batch over the shared prefix", rests_in_one_batch)):
        try:
            prefill_s = fastest_s(run, args.runs)
        except Exception as exc:  # ONNX Runtime's refusal, named in the table
            print(f"| {name} | refused: {str(exc).split('Status Message: ')[-1][:100]} | - | - |")
            continue
        print(f"| {name} | {prefill_s * 1e3:.0f} | {tokens / (decode_s + prefill_s):.0f} | "
              f"{decode_s / (decode_s + prefill_s):.3f} |")


if __name__ == "__main__":
    main()

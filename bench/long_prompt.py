"""A long prompt joining streams that are decoding: its time to first token against their inter-token latency.

The engine alone (no gRPC), real model. `--streams` greedy streams decode; once they are steady a prompt of about
`--prompt-tokens` tokens is submitted. For each prefill chunk size the script prints the long prompt's TTFT and
the running streams' ITL while it was being prefilled (mean and worst gap), next to their ITL just before.
usage: python -m bench.long_prompt [--model-dir DIR] [--chunks 64,128,256,512] [--prompt-tokens 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from services.common.config import lmesh_cache
from services.inference.engine import Engine, EngineLimits, GenerationRequest, TokenEvent
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import SamplingConfig
from services.model.manifest import ModelManifest
from services.model.reference import chat_prompt_ids

STEADY_S = 4.0  # long enough for every running stream's prompt to be in and decoding


async def one_chunk_size(decoder: OnnxDecoder, chunk: int, running_prompts: list[list[int]],
                         long_prompt: list[int]) -> str:
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(prefill_chunk=chunk, prefix_cache_bytes=0))
    engine.start()
    arrivals: list[list[float]] = [[] for _ in running_prompts]

    async def read(index: int, seq: object) -> None:
        while isinstance(await seq.events.get(), TokenEvent):  # type: ignore[attr-defined]
            arrivals[index].append(time.perf_counter())

    try:
        running = [engine.submit(GenerationRequest(prompt_ids=p, max_tokens=4096, sampling=SamplingConfig()))
                   for p in running_prompts]
        readers = [asyncio.create_task(read(i, seq)) for i, seq in enumerate(running)]
        await asyncio.sleep(STEADY_S)
        submitted = time.perf_counter()
        joiner = engine.submit(GenerationRequest(prompt_ids=long_prompt, max_tokens=1, sampling=SamplingConfig()))
        await joiner.events.get()
        first_token = time.perf_counter()
        for seq in running:
            engine.cancel(seq)
        await asyncio.gather(*readers)
    finally:
        await engine.close()
    during = [t for times in arrivals for t in times if submitted <= t <= first_token]
    gaps = np.concatenate([np.diff([submitted, *[t for t in times if submitted <= t <= first_token]])
                           for times in arrivals])
    before = np.concatenate([np.diff([t for t in times if submitted - 1.0 <= t <= submitted]) for times in arrivals])
    ttft = first_token - submitted
    mean_itl = len(running_prompts) * ttft / max(1, len(during))
    return (f"chunk {chunk:5d}: long prompt TTFT {ttft * 1000:6.0f} ms | running streams' ITL before "
            f"{np.median(before) * 1000:5.1f} ms, during its prefill mean {mean_itl * 1000:6.1f} ms, "
            f"worst {gaps.max() * 1000:6.1f} ms | their tokens/s during {len(during) / ttft:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--chunks", default="64,128,256,512", help="prefill chunk sizes to compare")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=15, help="streams decoding when the long prompt arrives")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    manifest = ModelManifest.load(args.model_dir)
    decoder = OnnxDecoder(args.model_dir / manifest.model_file, threads=args.threads)
    running = [chat_prompt_ids(args.model_dir, f"Tell me story number {i} about a cat.") for i in range(args.streams)]
    facts = " ".join(f"Fact {i}: the sky is blue." for i in range(args.prompt_tokens // 9))
    long_prompt = chat_prompt_ids(args.model_dir, f"{facts}\nWhich fact comes last?")
    print(f"{args.streams} streams decoding; a {len(long_prompt)}-token prompt joins")
    for chunk in (int(c) for c in args.chunks.split(",")):
        print(asyncio.run(one_chunk_size(decoder, chunk, running, long_prompt)), flush=True)


if __name__ == "__main__":
    main()

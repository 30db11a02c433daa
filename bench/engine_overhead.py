"""The engine's own cost at one stream: the lmesh engine (no gRPC) against the plain in-process ORT loop.

Both run in this process on the same session settings, alternating, with end-of-turn ignored so each makes
exactly N tokens (prefill included). usage: python -m bench.engine_overhead [--model-dir DIR] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from services.common.config import lmesh_cache
from services.inference.engine import Engine, EngineLimits, GenerationRequest, TokenEvent
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import SamplingConfig
from services.model.manifest import ModelManifest
from services.model.reference import _session, chat_prompt_ids, greedy_with_session

QUESTION = "Tell me a long story about a brave cat who sails the seas."


async def engine_rate(decoder: OnnxDecoder, prompt: list[int], tokens: int) -> float:
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(prefix_cache_bytes=0))
    engine.start()
    try:
        started = time.perf_counter()
        seq = engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=tokens, sampling=SamplingConfig()))
        made = 0
        while isinstance(await seq.events.get(), TokenEvent):
            made += 1
        return made / (time.perf_counter() - started)
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    manifest = ModelManifest.load(args.model_dir)
    prompt = chat_prompt_ids(args.model_dir, QUESTION)
    session = _session(str(args.model_dir / manifest.model_file), 2)
    decoder = OnnxDecoder(args.model_dir / manifest.model_file, threads=2)
    greedy_with_session(session, manifest, prompt, 8, stop_on_eos=False)  # warm-up
    asyncio.run(engine_rate(decoder, prompt, 8))
    for _ in range(args.pairs):
        started = time.perf_counter()
        made = len(greedy_with_session(session, manifest, prompt, args.tokens, stop_on_eos=False))
        loop = made / (time.perf_counter() - started)
        engine = asyncio.run(engine_rate(decoder, prompt, args.tokens))
        print(f"in-process loop {loop:6.1f} tok/s   engine {engine:6.1f} tok/s   ratio {engine / loop:.3f}")


if __name__ == "__main__":
    main()

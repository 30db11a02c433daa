"""GPU check for the inference engine: CUDA with the KV cache bound on the device vs plain CUDA vs CPU.

Runs the real engine (continuous batching, one ONNX Runtime run per step) for 1 and 16 streams, forcing the
same number of tokens per stream, and checks that CUDA's greedy tokens match the CPU's.
usage: python -m bench.gpu_check --model-dir DIR [--tokens 64] [--model-file model.fp16.onnx]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from services.inference.engine import Engine, EngineLimits, FinishEvent, GenerationRequest, TokenEvent
from services.inference.onnx_model import OnnxDecoder
from services.inference.sampling import SamplingConfig

QUESTIONS = [
    "What is the capital of France?", "Write a poem about the sea.", "Explain photosynthesis simply.",
    "List five fruits and their colors.", "How do airplanes fly?", "Tell me a story about a brave cat.",
    "What is machine learning?", "Describe a sunset over the mountains.", "Why is the sky blue?",
    "Give me three tips for studying.", "What causes rain?", "How does a computer work?",
    "Describe the water cycle.", "What is gravity?", "Write a short letter to a friend.", "How do bees make honey?",
]


def prompts(model_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                             add_special_tokens=False).ids for q in QUESTIONS]


async def generate(engine: Engine, batch: list[list[int]], tokens: int) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    seqs = [engine.submit(GenerationRequest(prompt_ids=p, max_tokens=tokens, sampling=SamplingConfig()))
            for p in batch]
    outputs: list[list[int]] = []
    for seq in seqs:
        out: list[int] = []
        while True:
            event = await seq.events.get()
            if isinstance(event, TokenEvent):
                out.append(event.sampled.token_id)
            elif isinstance(event, FinishEvent):
                break
            else:
                raise RuntimeError(str(event))
        outputs.append(out)
    return outputs, time.perf_counter() - started


async def measure(decoder: OnnxDecoder, all_prompts: list[list[int]], tokens: int) -> dict[str, object]:
    # No end-of-turn ids: every stream generates exactly `tokens`, so runs are comparable.
    engine = Engine(decoder, frozenset(), 8192, EngineLimits(max_active=16, prefix_cache_bytes=0))
    engine.start()
    try:
        await generate(engine, all_prompts[:2], 8)  # warm-up
        single, single_s = await generate(engine, all_prompts[:1], tokens)
        batch, batch_s = await generate(engine, all_prompts, tokens)
    finally:
        await engine.close()
    return {"single_tok_s": round(tokens / single_s, 1), "batch16_tok_s": round(16 * tokens / batch_s, 1),
            "single_tokens": single, "batch_tokens": batch}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean length of the common greedy prefix, as a fraction of the generated length."""
    shares = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        shares.append(n / max(1, len(x)))
    return sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model-file", default="model.fp16.onnx",
                        help="model file in the folder (default: the fp16 variant, whose attention has CUDA kernels)")
    args = parser.parse_args()
    all_prompts = prompts(args.model_dir)
    path = args.model_dir / args.model_file
    results: dict[str, dict[str, object]] = {}
    cpu = OnnxDecoder(path, providers=["CPUExecutionProvider"])
    results["cpu"] = asyncio.run(measure(cpu, all_prompts, args.tokens))
    del cpu
    cuda = OnnxDecoder(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda.on_gpu, cuda.providers
    results["cuda_iobinding"] = asyncio.run(measure(cuda, all_prompts, args.tokens))
    cuda.kv_on_device = False  # same session, KV bound in host memory: it crosses to the GPU and back every step
    results["cuda_plain"] = asyncio.run(measure(cuda, all_prompts, args.tokens))
    cpu_tokens = results["cpu"]["batch_tokens"]
    summary = {}
    for name, result in results.items():
        summary[name] = {
            "single_tok_s": result["single_tok_s"], "batch16_tok_s": result["batch16_tok_s"],
            "greedy_agreement_with_cpu": round(agreement(result["batch_tokens"], cpu_tokens), 3),  # type: ignore[arg-type]
            "batched_equals_single_stream": result["batch_tokens"][0] == result["single_tokens"][0],  # type: ignore[index]
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""A tiny decoder with random weights in the real model's graph layout, for tests of the engine's mechanics.

Batching, the KV cache's routes, the prefix cache and seeding do the same work on any weights: what a test of them
needs is the real graph (the same fused kernels, inputs and KV layout, built by `services.model.graph`) and the real
tokenizer, not 135M parameters. Two layers of width 64 decode a step some 30 times faster on the CPU. Tests of what
the model says, and of timings that depend on how long a real step takes, stay on the real build.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from services.model.graph import LlamaConfig, build_graph
from services.model.manifest import FP16_MANIFEST_FILE, MANIFEST_FILE

TINY_NAME = "tiny-random"
TINY_CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=10000.0, max_positions=8192,
                          tie_word_embeddings=True)


def tiny_weights(config: LlamaConfig, seed: int) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face's names. The embedding's scale (1, not 0.02) spreads the logits, so a greedy
    answer's top token leads the next one by far more than any batching's rounding."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float = 0.2) -> np.ndarray:
        return rng.normal(0.0, std, shape).astype(np.float32)

    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    weights = {"model.embed_tokens.weight": normal(config.vocab_size, h, std=1.0),
               "model.norm.weight": np.ones(h, np.float32)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.input_layernorm.weight": np.ones(h, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(h, np.float32),
            f"{p}.self_attn.q_proj.weight": normal(config.num_heads * config.head_dim, h),
            f"{p}.self_attn.k_proj.weight": normal(kv, h),
            f"{p}.self_attn.v_proj.weight": normal(kv, h),
            f"{p}.self_attn.o_proj.weight": normal(h, config.num_heads * config.head_dim),
            f"{p}.mlp.gate_proj.weight": normal(config.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": normal(config.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": normal(h, config.intermediate_size),
        }
    return weights


def build_tiny_model(real_model: Path, out_dir: Path, seed: int = 0) -> Path:
    """`out_dir` as `make model` lays a build out (fp32 and fp16 graphs, manifests, the real tokenizer), with the
    real build's chat template, special tokens and context length under the name `tiny-random`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(TINY_CONFIG, seed)
    build_graph(TINY_CONFIG, weights, out_dir / "model.onnx")
    build_graph(TINY_CONFIG, weights, out_dir / "model.fp16.onnx", fp16=True)
    real = json.loads((real_model / MANIFEST_FILE).read_text(encoding="utf-8"))
    shutil.copyfile(real_model / real["tokenizer_file"], out_dir / "tokenizer.json")
    shape = {field.name: getattr(TINY_CONFIG, field.name) for field in dataclasses.fields(TINY_CONFIG)
             if field.name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
    manifest = {**real, **shape, "name": TINY_NAME, "version": "1", "model_file": "model.onnx",
                "tokenizer_file": "tokenizer.json", "source": {"file": "random", "sha256": f"seed-{seed}"}}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    fp16 = {**manifest, "version": "1-fp16", "model_file": "model.fp16.onnx", "dtype": "float16"}
    (out_dir / FP16_MANIFEST_FILE).write_text(json.dumps(fp16, indent=2), encoding="utf-8")
    return out_dir

"""Builds the ONNX decoder graph directly from a Llama-family checkpoint, with ONNX Runtime's fused kernels.

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm in one kernel), one fused QKV MatMul,
com.microsoft.GroupQueryAttention (rotary embedding, grouped heads and the KV append in one kernel),
the o_proj MatMul and a SiLU-gated MLP. No torch tracing: the graph is written node by node, so it has no
per-layer shape plumbing, and its I/O suits continuous batching:

  inputs   input_ids [b, s] int64
           seqlens_k [b] int32: per row, (tokens in its KV cache after this run) - 1
           total_sequence_length [] int32: max over rows of seqlens_k + 1 (at least s; up to the past's capacity
                                           when present shares the past's buffer)
           logits_positions [n] int64: rows of the flattened [b*s] positions whose logits are wanted
           past_key_values.{i}.key / .value [b, kv_heads, past, head_dim] float32 (float16 in the fp16 variant)
  outputs  logits [n, vocab] float32
           present.{i}.key / .value [b, kv_heads, max(past, total), head_dim] like the past

KV rows are right-padded: row r's tokens occupy positions [0, seqlens_k[r] + 1). When a present tensor is
bound to the same buffer as its past (ONNX Runtime detects the shared pointer), new keys and values are written
in place at each row's own offset and nothing is copied. GroupQueryAttention restricts s > 1 with a non-empty
past to batch 1; a batched prompt with an empty past ("first prompt") is right-padded to the longest row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 21
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf_dir: Path) -> LlamaConfig:
        data = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        rope = data.get("rope_parameters") or {}
        if (rope.get("rope_type") or "default") != "default" or data.get("rope_scaling"):
            raise ValueError("only the default rotary embedding is supported")
        heads = int(data["num_attention_heads"])
        return cls(
            hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]),
            num_layers=int(data["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(data.get("num_key_value_heads", heads)),
            head_dim=int(data.get("head_dim") or data["hidden_size"] // heads),
            vocab_size=int(data["vocab_size"]),
            rms_norm_eps=float(data["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
            max_positions=int(data["max_position_embeddings"]),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        )


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "seqlens_k", "total_sequence_length", "logits_positions"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def step_inputs(input_ids: Any, seqlens_k: Any, logits_positions: Any,
                total_length: int | None = None) -> dict[str, np.ndarray]:
    """The non-KV inputs of one call, typed as the graph wants; total_sequence_length derived from the rest unless
    given (at least that; a decode over buffers of fixed capacity passes the capacity)."""
    seqlens = np.ascontiguousarray(seqlens_k, dtype=np.int32)
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    total = max(int(seqlens.max()) + 1, ids.shape[1])
    if total_length is not None:
        if total_length < total:
            raise ValueError(f"total_length {total_length} is below the rows' {total}")
        total = total_length
    return {
        "input_ids": ids,
        "seqlens_k": seqlens,
        "total_sequence_length": np.asarray(total, dtype=np.int32),
        "logits_positions": np.ascontiguousarray(logits_positions, dtype=np.int64),
    }


def rotary_caches(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] of the default (non-interleaved) rotary embedding, as HF computes it."""
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.int64).astype(np.float32)
                                            / config.head_dim))
    positions = np.arange(config.max_positions, dtype=np.float32)
    angles = np.outer(positions, inv_freq).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_graph(config: LlamaConfig, weights: dict[str, np.ndarray], path: Path, *, fp16: bool = False) -> None:
    """Writes the decoder to `path` as one self-contained file (the registry stores an artifact as one blob).

    fp16: weights, activations and the KV cache in float16 (logits stay float32) — the variant for CUDA, whose
    GroupQueryAttention kernel exists for float16 and bfloat16 only (an fp32 graph's attention would fall back
    to the CPU there, moving the KV cache off the device every step).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    dtype = np.float16 if fp16 else np.float32
    onnx_dtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT

    def weight(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: Any) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))

    def linear(x: str, hf_name: str, out: str, name: str) -> None:
        node("MatMul", [x, weight(f"{hf_name}.T", weights[hf_name].T)], [out], name)

    embed = weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    cos, sin = rotary_caches(config)
    weight("cos_cache", cos)
    weight("sin_cache", sin)
    eps = config.rms_norm_eps
    node("Gather", [embed, "input_ids"], ["embeddings"], "embed_tokens")

    residual, pending = "embeddings", ""  # `pending` is a sublayer output not yet added to the residual
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        ln_in = weight(f"{p}.input_layernorm.weight", weights[f"{p}.input_layernorm.weight"])
        if pending:
            node("SkipSimplifiedLayerNormalization", [residual, pending, ln_in],
                 [f"l{i}.attn_in", "", "", f"l{i}.residual_attn"], f"l{i}.input_layernorm", MS_DOMAIN, epsilon=eps)
            residual = f"l{i}.residual_attn"
        else:
            node("SimplifiedLayerNormalization", [residual, ln_in], [f"l{i}.attn_in"], f"l{i}.input_layernorm",
                 axis=-1, epsilon=eps, stash_type=1)
        qkv = np.concatenate([weights[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"], axis=0)
        node("MatMul", [f"l{i}.attn_in", weight(f"{p}.self_attn.qkv_proj.weight.T", qkv.T)], [f"l{i}.qkv"],
             f"l{i}.qkv_proj")
        node("GroupQueryAttention",
             [f"l{i}.qkv", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
              "total_sequence_length", "cos_cache", "sin_cache"],
             [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"], f"l{i}.attention", MS_DOMAIN,
             num_heads=config.num_heads, kv_num_heads=config.num_kv_heads, scale=1.0 / float(np.sqrt(config.head_dim)),
             do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        linear(f"l{i}.attn", f"{p}.self_attn.o_proj.weight", f"l{i}.attn_out", f"l{i}.o_proj")
        ln_post = weight(f"{p}.post_attention_layernorm.weight", weights[f"{p}.post_attention_layernorm.weight"])
        node("SkipSimplifiedLayerNormalization", [residual, f"l{i}.attn_out", ln_post],
             [f"l{i}.mlp_in", "", "", f"l{i}.residual_mlp"], f"l{i}.post_attention_layernorm", MS_DOMAIN, epsilon=eps)
        residual = f"l{i}.residual_mlp"
        linear(f"l{i}.mlp_in", f"{p}.mlp.gate_proj.weight", f"l{i}.gate", f"l{i}.gate_proj")
        linear(f"l{i}.mlp_in", f"{p}.mlp.up_proj.weight", f"l{i}.up", f"l{i}.up_proj")
        node("Sigmoid", [f"l{i}.gate"], [f"l{i}.gate_sigmoid"], f"l{i}.silu_sigmoid")
        node("Mul", [f"l{i}.gate", f"l{i}.gate_sigmoid"], [f"l{i}.silu"], f"l{i}.silu")
        node("Mul", [f"l{i}.silu", f"l{i}.up"], [f"l{i}.gated"], f"l{i}.gate_mul")
        linear(f"l{i}.gated", f"{p}.mlp.down_proj.weight", f"l{i}.mlp_out", f"l{i}.down_proj")
        pending = f"l{i}.mlp_out"

    final_ln = weight("model.norm.weight", weights["model.norm.weight"])
    node("SkipSimplifiedLayerNormalization", [residual, pending, final_ln], ["final_norm"], "final_norm", MS_DOMAIN,
         epsilon=eps)
    # Only the requested positions reach the vocabulary projection: a prompt chunk pays for one row, not s.
    node("Reshape", ["final_norm", weight_int64(initializers, "flat_shape", [-1, config.hidden_size])],
         ["final_norm_flat"], "flatten")
    node("Gather", ["final_norm_flat", "logits_positions"], ["selected"], "select_positions", axis=0)
    head_out = "logits_half" if fp16 else "logits"
    if config.tie_word_embeddings:
        node("Gemm", ["selected", embed], [head_out], "lm_head", transB=1)  # shares the embedding matrix
    else:
        linear("selected", "lm_head.weight", head_out, "lm_head")
    if fp16:
        node("Cast", [head_out], ["logits"], "logits_to_float", to=TensorProto.FLOAT)

    kv = [config.num_kv_heads, config.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_positions", TensorProto.INT64, ["positions"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["positions", config.vocab_size])]
    for i in range(config.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", onnx_dtype, ["batch", kv[0], "past_seq", kv[1]]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", onnx_dtype, ["batch", kv[0], "present_seq", kv[1]]))
    graph = helper.make_graph(nodes, "lmesh_decoder", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="lmesh")
    model.ir_version = 10
    onnx.save_model(model, str(path))


def weight_int64(initializers: list[Any], name: str, values: list[int]) -> str:
    from onnx import numpy_helper

    initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def load_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights: dict[str, np.ndarray] = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return {k: v.astype(np.float32) for k, v in weights.items()}

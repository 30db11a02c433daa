"""The ONNX decoder with KV cache: one `run` per engine step, for a batch of sequences.

Inputs: input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], past_key_values.N.key/value [B,H,P,D];
outputs: logits [B,S,V], present.N.key/value [B,H,P+S,D]. Rows are left-padded to a common past length P;
padded positions carry attention_mask 0, and position ids are per row, so a row's result does not depend on
the rows it is batched with.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("lmesh.inference.model")

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# A KV tensor: a numpy array on the CPU, or an onnxruntime OrtValue that stays on the GPU between steps.
KV = Any


@dataclass(frozen=True)
class StepOutput:
    logits: np.ndarray  # [B, V] logits of each row's last position
    presents: list[KV]  # 2*L tensors [B, H, P+S, D], key then value per layer


class OnnxDecoder:
    """An onnxruntime session over a decoder model; CUDA when onnxruntime-gpu and a GPU are present."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or int(os.environ.get("LMESH_ORT_THREADS", os.cpu_count() or 1))
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        self.providers = self.session.get_providers()
        # On the GPU the KV cache is bound as device OrtValues so it never crosses to the host per step.
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self._ort = ort
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for name in inputs if name.endswith(".key") and name.startswith("past_key_values."))
        first_past = inputs["past_key_values.0.key"]
        self.num_kv_heads = int(first_past.shape[1])
        self.head_dim = int(first_past.shape[3])
        self.kv_dtype = _ORT_TYPES.get(first_past.type, np.float32)
        vocab_dim = self.session.get_outputs()[0].shape[2]
        self.vocab_size = vocab_dim if isinstance(vocab_dim, int) else 0
        self._past_names = [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self._output_names = ["logits"] + [
            f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")
        ]
        log.info("loaded %s on %s (%d layers)", path.name, self.providers[0], self.num_layers)

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self._past_names]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: list[KV]) -> StepOutput:
        if self.on_gpu:
            return self._run_bound(input_ids, attention_mask, position_ids, past)
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask.astype(np.int64, copy=False),
            "position_ids": position_ids.astype(np.int64, copy=False),
        }
        feeds.update(zip(self._past_names, past, strict=True))
        outputs = self.session.run(self._output_names, feeds)
        logits = outputs[0][:, -1, :]
        return StepOutput(logits=logits, presents=list(outputs[1:]))

    def _run_bound(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                   past: list[KV]) -> StepOutput:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, tensor in zip(self._past_names, past, strict=True):
            if isinstance(tensor, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(tensor))  # copied to the device once
            else:
                binding.bind_ortvalue_input(name, tensor)
        binding.bind_output("logits", "cpu")
        for name in self._output_names[1:]:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1, :]
        return StepOutput(logits=logits, presents=list(outputs[1:]))

    @staticmethod
    def to_numpy(tensor: KV) -> np.ndarray:
        """A host copy of a KV tensor (for re-packing a batch or the prefix cache); arrays pass through."""
        return tensor if isinstance(tensor, np.ndarray) else tensor.numpy()

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize

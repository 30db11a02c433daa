"""The ONNX decoder (graph and I/O in services.model.graph) and the decode batch's KV cache.

Prompts run with fresh outputs (`run`): a batch of new prompts right-padded in one run, or one prompt chunk
over its own past. Decoding runs in place (`decode`): every active sequence owns a row of one set of KV
buffers, right-padded, and the graph's present outputs are bound to the very buffers fed as past, so each
step writes one new key/value per row and copies nothing. On CUDA the buffers live on the device
(DeviceSlotCache): a joining sequence's KV is uploaded into its own row, and rows are moved on the device.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.model.graph import step_inputs

log = logging.getLogger("lmesh.inference.model")

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Decode buffers grow in steps of this many positions (and at least double), so a growing sequence
# re-allocates O(log n) times.
LENGTH_QUANTUM = 128


def grown_length(length: int, capacity: int, max_length: int) -> int:
    """The new capacity for `length` positions: a multiple of LENGTH_QUANTUM, at least double the old one."""
    return min(max_length, max(-(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM, 2 * capacity))


def shrunk_length(length: int, capacity: int) -> int | None:
    """A smaller capacity once the longest row needs under a quarter of it (a long sequence left), else None."""
    if capacity <= 4 * LENGTH_QUANTUM or length * 4 > capacity:
        return None
    return max(LENGTH_QUANTUM, -(-2 * length // LENGTH_QUANTUM) * LENGTH_QUANTUM)


def kv_buffer(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed host array whose memory is committed only where written, in small pages.

    numpy asks the kernel for transparent huge pages on large arrays. A decode buffer is written sparsely (each
    row and head holds its first few positions of a long capacity), so 2 MB pages would commit nearly all of it
    as soon as every row holds a little: gigabytes of RSS, and seconds of page zeroing when a long sequence joins
    the batch and the buffers grow to its length.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < 2 * mmap.PAGESIZE or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes)  # anonymous: zero-filled, released when the array (its only owner) goes
    region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, dtype=dtype).reshape(shape)


@dataclass(frozen=True)
class StepOutput:
    logits: np.ndarray  # [n, V]: the requested positions' logits
    presents: list[np.ndarray]  # 2*L tensors [B, H, T, D], key then value per layer


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
        if "CUDAExecutionProvider" in wanted and hasattr(ort, "preload_dlls"):
            # The CUDA and cuDNN libraries that `onnxruntime-gpu[cuda,cudnn]` installs from PyPI (see
            # deploy/scripts/gpu_runtime.sh) are found only once preloaded; system-wide CUDA needs none of it.
            try:
                ort.preload_dlls()
            except Exception as exc:  # a failed preload leaves the system libraries to try
                log.warning("could not preload the CUDA libraries from PyPI packages: %s", exc)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        past_type = next(i.type for i in self.session.get_inputs() if i.name == "past_key_values.0.key")
        if self.session.get_providers()[0] == "CUDAExecutionProvider" and past_type == "tensor(float)":
            # CUDA's GroupQueryAttention is float16/bfloat16 only: a float32 graph's attention would run on the
            # CPU between CUDA nodes, its KV buffers copied across and no longer shared in place, and
            # GroupQueryAttention reads a padded past only in place. The whole graph runs on the CPU instead.
            log.warning("%s is a float32 graph, which runs on the CPU: ONNX Runtime's CUDA GroupQueryAttention is "
                        "float16/bfloat16 only; serve the fp16 variant (model.fp16.onnx, version <n>-fp16) on "
                        "GPUs", path.name)
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        # On the GPU the decode KV buffers are device buffers that stay there between steps (DeviceSlotCache).
        # Tests turn this on over CPU memory to take the same route without a GPU.
        self.kv_on_device = self.on_gpu
        # On the GPU the device cache is allocated once at its full length: every decode run then has the same
        # shapes, so CUDA's kernels (which pick their algorithms and attention splits by shape) treat each row
        # the same whatever else is in the batch. Tests turn it on over small CPU caches.
        self.kv_fixed_length = self.on_gpu
        self.kv_device = "cuda" if self.on_gpu else "cpu"
        self._ort = ort
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "seqlens_k" not in inputs:
            raise ValueError(f"{path.name} has an older graph layout (no seqlens_k input): rebuild it with "
                             f"`make model` and register it again")
        self.num_layers = sum(1 for name in inputs if name.endswith(".key") and name.startswith("past_key_values."))
        first_past = inputs["past_key_values.0.key"]
        self.num_kv_heads = int(first_past.shape[1])
        self.head_dim = int(first_past.shape[3])
        self.kv_dtype = _ORT_TYPES.get(first_past.type, np.float32)
        vocab_dim = self.session.get_outputs()[0].shape[1]
        if not isinstance(vocab_dim, int):
            raise ValueError(f"{path.name}: the logits output needs a static vocabulary dimension")
        self.vocab_size = vocab_dim
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        log.info("loaded %s on %s (%d layers)", path.name, self.providers[0], self.num_layers)

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]

    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize

    def run(self, input_ids: np.ndarray, seqlens_k: np.ndarray, logits_positions: np.ndarray,
            past: list[np.ndarray]) -> StepOutput:
        """A prompt run with fresh present outputs (host arrays, also on CUDA: prompts are the rare step)."""
        feeds = step_inputs(input_ids, seqlens_k, logits_positions)
        feeds.update(zip(self.past_names, past, strict=True))
        outputs = self.session.run(["logits", *self.present_names], feeds)
        return StepOutput(logits=outputs[0], presents=list(outputs[1:]))

    def decode(self, input_ids: np.ndarray, seqlens_k: np.ndarray,
               cache: SlotCache | DeviceSlotCache) -> np.ndarray:
        """One token per row of `cache`, appended in place; returns logits [rows, V].

        The logits array is the cache's output buffer: the next decode overwrites it.
        """
        binding, logits = cache.binding()
        rows = input_ids.shape[0]
        bound = logits.shape[0]
        if bound > rows:  # a device cache binds a fixed number of rows: the unused ones decode a dummy token
            input_ids = np.concatenate([input_ids, np.zeros((bound - rows, 1), dtype=np.int64)])
            seqlens_k = np.concatenate([seqlens_k, np.zeros(bound - rows, dtype=np.int64)])
        for name, value in step_inputs(input_ids, seqlens_k, np.arange(bound), cache.total_length).items():
            binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(binding)
        return logits[:rows]

    def slot_cache(self, max_rows: int, max_length: int) -> SlotCache | DeviceSlotCache:
        """The decode KV cache for this session: on the device when `kv_on_device` (CUDA), else host buffers."""
        if self.kv_on_device:
            return DeviceSlotCache(self, max_rows, max_length, fixed_length=self.kv_fixed_length)
        if self.on_gpu:
            # GroupQueryAttention takes a right-padded past only when present shares its buffer; host buffers
            # bound to a CUDA session are copied to separate device ones, and its tokens come out wrong.
            raise ValueError("a CUDA session keeps its decode KV cache on the device (kv_on_device)")
        return SlotCache(self, max_rows, max_length)


class SlotCache:
    """The decode batch's KV cache in host memory: row r of every buffer [rows, H, length, D] holds sequence r,
    right-padded.

    Rows are kept dense (a leaving sequence's row is filled with the last row), so a run feeds the buffers'
    first `rows` rows, which are contiguous views. Capacity grows geometrically in both dimensions.
    """

    def __init__(self, model: OnnxDecoder, max_rows: int, max_length: int) -> None:
        self._model = model
        self._max_rows = max_rows
        self._max_length = max_length
        self.rows = 0
        self._host: list[np.ndarray] = []
        self._binding: Any = None
        self._logits = np.empty((0, 0), dtype=np.float32)

    @property
    def length_capacity(self) -> int:
        return self._host[0].shape[2] if self._host else 0

    # A decode over host buffers passes the rows' own total length (shapes change with the rows anyway).
    total_length: int | None = None

    def clear(self) -> None:
        self.rows = 0
        self._host, self._binding = [], None

    def reserve(self, rows: int, length: int) -> None:
        """Ensures room for `rows` rows of `length` positions, keeping the current rows' contents."""
        if length > self._max_length or rows > self._max_rows:
            raise ValueError(f"KV cache request {rows}x{length} exceeds {self._max_rows}x{self._max_length}")
        cap_rows = self._host[0].shape[0] if self._host else 0
        cap_len = self.length_capacity
        if rows <= cap_rows and length <= cap_len:
            return
        new_rows = min(self._max_rows, max(rows, 2 * cap_rows))
        new_len = grown_length(length, cap_len, self._max_length)
        model = self._model
        shape = (new_rows, model.num_kv_heads, new_len, model.head_dim)
        grown = [kv_buffer(shape, model.kv_dtype) for _ in model.past_names]
        for old, new in zip(self._host, grown, strict=False):
            new[: self.rows, :, :cap_len] = old[: self.rows]
        self._host = grown
        self._binding = None

    def shrink(self, length: int) -> None:
        """Gives memory back when the longest row needs far less than the capacity (a long sequence left)."""
        new_len = shrunk_length(length, self.length_capacity)
        if new_len is None:
            return
        shrunk = [kv_buffer((*b.shape[:2], new_len, b.shape[3]), b.dtype) for b in self._host]
        for old, new in zip(self._host, shrunk, strict=True):
            new[: self.rows] = old[: self.rows, :, :new_len]
        self._host = shrunk
        self._binding = None

    def put(self, row: int, kv: list[np.ndarray], length: int) -> None:
        """Writes a sequence's cache ([1, H, >=length, D] per tensor) into `row` (row <= rows)."""
        for buffer, tensor in zip(self._host, kv, strict=True):
            buffer[row, :, :length] = tensor[0, :, :length]
        if row == self.rows:
            self.rows += 1
            self._binding = None

    def move(self, src: int, dst: int, length: int) -> None:
        for buffer in self._host:
            buffer[dst, :, :length] = buffer[src, :, :length]

    def pop(self) -> None:
        """Drops the last row."""
        self.rows -= 1
        self._binding = None

    def row(self, row: int, length: int) -> list[np.ndarray]:
        """Views of one row's first `length` positions ([1, H, length, D] per tensor), valid until the rows or
        the buffers change: copy what must outlive that."""
        return [b[row:row + 1, :, :length] for b in self._host]

    def binding(self) -> tuple[Any, np.ndarray]:
        """The I/O binding with past and present bound to the same buffers (rebuilt when rows or capacity change),
        and the host array its logits output is written into (no per-step allocation or output wrapping)."""
        if self._binding is None:
            model = self._model
            ort = model._ort
            binding = model.session.io_binding()
            self._logits = np.empty((self.rows, model.vocab_size), dtype=np.float32)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
            values = [ort.OrtValue.ortvalue_from_numpy(b[: self.rows]) for b in self._host]
            for past, present, value in zip(model.past_names, model.present_names, values, strict=True):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._binding = binding
        return self._binding, self._logits



class KvCopier:
    """Copies every KV tensor's per-head blocks [n, D] between host arrays and device buffers, or within the device,
    in one ONNX Runtime run: a graph of Identity nodes whose inputs and outputs are bound to raw pointers.

    ONNX Runtime's Python API moves only whole tensors; a row of the device cache is 2*L*H blocks inside larger
    buffers (a head's positions are contiguous, heads are `capacity` positions apart), which pointer binding
    addresses without copying anything else.
    """

    def __init__(self, model: OnnxDecoder, device: str) -> None:
        import onnx
        from onnx import helper

        ort = model._ort
        self.blocks = len(model.past_names) * model.num_kv_heads
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(model.kv_dtype))
        inputs = [helper.make_tensor_value_info(f"x{k}", elem, [f"n{k}", model.head_dim]) for k in range(self.blocks)]
        outputs = [helper.make_tensor_value_info(f"y{k}", elem, [f"n{k}", model.head_dim]) for k in range(self.blocks)]
        nodes = [helper.make_node("Identity", [f"x{k}"], [f"y{k}"]) for k in range(self.blocks)]
        graph = helper.make_graph(nodes, "lmesh_kv_copy", inputs, outputs)
        # IR version 10 (opset 21): readable by every onnxruntime this project supports, whatever onnx wrote it.
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every Identity
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=providers)
        self._dtype = np.dtype(model.kv_dtype)
        self._dim = model.head_dim

    def copy(self, sources: list[tuple[str, int]], targets: list[tuple[str, int]], n: int) -> None:
        """Copies `n` positions from each source block to its target; a block is (device, address)."""
        if n <= 0:
            return
        binding = self._session.io_binding()
        shape = [n, self._dim]
        for k, ((src_device, src), (dst_device, dst)) in enumerate(zip(sources, targets, strict=True)):
            binding.bind_input(f"x{k}", src_device, 0, self._dtype, shape, src)
            binding.bind_output(f"y{k}", dst_device, 0, self._dtype, shape, dst)
        self._session.run_with_iobinding(binding)


class DeviceSlotCache:
    """The decode batch's KV cache on the device (CUDA): buffers [max_rows, H, capacity, D] that stay there.

    Rows are kept dense like SlotCache's, and every decode run binds all `max_rows` rows by address, the unused ones
    decoding a dummy token: the run's input shapes change only with the capacity. On CUDA, ONNX Runtime's first
    run at a new shape costs 70-90 ms (measured on an H100 and an H200; the next one 3-7 ms), which binding the live
    rows alone paid at every new batch size. A joining sequence's KV is uploaded into its own row only, a leaving
    row is refilled from the last one on the device, and a row leaving for the prefix cache is the only one brought
    back to the host; the whole cache is copied (on the device) only when the capacity grows or shrinks,
    geometrically, so rarely. With `fixed_length` (the GPU's default) the buffers hold `max_length` positions from
    the start and never change: every decode run has the same shapes, so a row's logits do not depend on the
    other rows (see `total_length`), and no run pays a new shape's first-run cost.
    """

    def __init__(self, model: OnnxDecoder, max_rows: int, max_length: int, fixed_length: bool = False) -> None:
        self._model = model
        self._max_rows = max_rows
        self._max_length = max_length
        self._device = model.kv_device
        self._copier = KvCopier(model, self._device)
        self._itemsize = np.dtype(model.kv_dtype).itemsize
        self.rows = 0
        self._buffers: list[Any] = []  # OrtValues [max_rows, H, capacity, D] on the device
        self._capacity = 0
        self._binding: Any = None
        self._logits = np.empty((0, 0), dtype=np.float32)
        self._fixed = fixed_length
        if fixed_length:
            self._reallocate(max_length)

    @property
    def length_capacity(self) -> int:
        return self._capacity

    @property
    def total_length(self) -> int | None:
        """What a decode run passes as total_sequence_length: with a fixed length, the capacity, so the attention
        kernel splits every row's keys the same way whatever the other rows' lengths (CUDA picks its splits from
        this total); otherwise the rows' own."""
        return self._capacity if self._fixed else None

    def clear(self) -> None:
        """Forgets every row; the device memory stays allocated for the next batch (`shrink` returns it)."""
        self.rows = 0

    def reserve(self, rows: int, length: int) -> None:
        if length > self._max_length or rows > self._max_rows:
            raise ValueError(f"KV cache request {rows}x{length} exceeds {self._max_rows}x{self._max_length}")
        if length > self._capacity:
            self._reallocate(grown_length(length, self._capacity, self._max_length))

    def shrink(self, length: int) -> None:
        new_len = None if self._fixed else shrunk_length(length, self._capacity)
        if new_len is not None:
            self._reallocate(new_len)

    def put(self, row: int, kv: list[np.ndarray], length: int) -> None:
        """Uploads a sequence's cache ([1, H, >=length, D] per host tensor) into `row` (row <= rows)."""
        kv = [np.ascontiguousarray(t, dtype=self._model.kv_dtype) for t in kv]  # addressed byte by byte below
        sources = [("cpu", t.ctypes.data + h * t.shape[2] * self._row_stride_unit())
                   for t in kv for h in range(self._model.num_kv_heads)]
        self._copier.copy(sources, self._blocks(row), length)
        if row == self.rows:
            self.rows += 1

    def move(self, src: int, dst: int, length: int) -> None:
        self._copier.copy(self._blocks(src), self._blocks(dst), length)

    def pop(self) -> None:
        self.rows -= 1

    def row(self, row: int, length: int) -> list[np.ndarray]:
        """A copy of one row's first `length` positions ([1, H, length, D] per tensor), brought to the host."""
        model = self._model
        out = [np.empty((1, model.num_kv_heads, length, model.head_dim), dtype=model.kv_dtype)
               for _ in model.past_names]
        targets = [("cpu", t.ctypes.data + h * length * self._row_stride_unit())
                   for t in out for h in range(model.num_kv_heads)]
        self._copier.copy(self._blocks(row), targets, length)
        return out

    def binding(self) -> tuple[Any, np.ndarray]:
        """The I/O binding of all `max_rows` rows, past and present on the same device memory (rebuilt when the
        capacity changes), and the host array its logits output is written into."""
        if self._binding is None:
            model = self._model
            binding = model.session.io_binding()
            self._logits = np.empty((self._max_rows, model.vocab_size), dtype=np.float32)
            binding.bind_ortvalue_output("logits", model._ort.OrtValue.ortvalue_from_numpy(self._logits))
            shape = [self._max_rows, model.num_kv_heads, self._capacity, model.head_dim]
            for past, present, buffer in zip(model.past_names, model.present_names, self._buffers, strict=True):
                binding.bind_input(past, self._device, 0, model.kv_dtype, shape, buffer.data_ptr())
                binding.bind_output(present, self._device, 0, model.kv_dtype, shape, buffer.data_ptr())
            self._binding = binding
        return self._binding, self._logits

    def _row_stride_unit(self) -> int:
        """Bytes of one position of one head."""
        return self._model.head_dim * self._itemsize

    def _blocks(self, row: int, buffers: list[Any] | None = None, capacity: int | None = None,
                ) -> list[tuple[str, int]]:
        """(device, address) of each tensor's and head's first position of `row`."""
        heads = self._model.num_kv_heads
        capacity = self._capacity if capacity is None else capacity
        unit = self._row_stride_unit()
        return [(self._device, buffer.data_ptr() + (row * heads + h) * capacity * unit)
                for buffer in (self._buffers if buffers is None else buffers) for h in range(heads)]

    def _reallocate(self, capacity: int) -> None:
        """New zeroed buffers of `capacity` positions, the current rows copied over on the device."""
        model = self._model
        shape = (self._max_rows, model.num_kv_heads, capacity, model.head_dim)
        zeros = kv_buffer(shape, model.kv_dtype)  # written over each buffer: positions past a row's length stay finite
        grown = []
        for _ in model.past_names:
            buffer = model._ort.OrtValue.ortvalue_from_shape_and_type(shape, model.kv_dtype, self._device, 0)
            buffer.update_inplace(zeros)
            grown.append(buffer)
        keep = min(capacity, self._capacity)
        for row in range(self.rows):
            self._copier.copy(self._blocks(row), self._blocks(row, grown, capacity), keep)
        self._buffers, self._capacity, self._binding = grown, capacity, None

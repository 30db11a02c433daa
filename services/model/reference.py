"""A plain in-process ONNX Runtime greedy loop: the correctness and speed reference for the engine.

No batching, no scheduling: one prompt, a KV cache carried between calls, argmax each step. The
inference service must produce the same tokens (greedy) and should beat its tokens/s.
`python -m services.model.reference [--dir DIR] [--variant int8|fp16] [PROMPT]` prints the answer and tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.model.manifest import ManifestError, ModelManifest

INTRA_OP_THREADS = 2


@functools.lru_cache(maxsize=4)
def _session(model_path: str, intra_op_threads: int) -> Any:
    # Cached: building a session over a 0.5 GB graph takes seconds, tests call this repeatedly.
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def load_session(
    model_dir: Path | str, *, variant: str = "", intra_op_threads: int = INTRA_OP_THREADS
) -> Any:
    manifest = ModelManifest.load(model_dir, variant=variant)
    return _session(str(manifest.model_path(model_dir).resolve()), intra_op_threads)


def empty_past(manifest: ModelManifest, batch: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The past_key_values feeds for a prefill: [batch, kv_heads, 0, head_dim] per layer."""
    shape = (batch, manifest.num_kv_heads, 0, manifest.head_dim)
    feeds: dict[str, np.ndarray] = {}
    for i in range(manifest.num_layers):
        feeds[f"past_key_values.{i}.key"] = np.zeros(shape, dtype)
        feeds[f"past_key_values.{i}.value"] = np.zeros(shape, dtype)
    return feeds


def kv_dtype(session: Any) -> Any:
    """The KV cache's element type of a session's model (float16 for the fp16 variant)."""
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    return np.float16 if past.type == "tensor(float16)" else np.float32


def run_step(
    session: Any,
    manifest: ModelManifest,
    input_ids: np.ndarray,
    seqlens_k: np.ndarray,
    logits_positions: np.ndarray,
    past: dict[str, np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One decoder call (I/O in services.model.graph); returns logits [n, vocab] and the next call's past.

    seqlens_k[r] is row r's cache length after this call minus one; logits_positions index the flattened
    [batch * seq] positions whose logits are returned.
    """
    from services.model.graph import step_inputs

    feeds = {**step_inputs(input_ids, seqlens_k, logits_positions), **past}
    outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    by_name = dict(zip(names, outputs, strict=True))
    new_past: dict[str, np.ndarray] = {}
    for i in range(manifest.num_layers):
        new_past[f"past_key_values.{i}.key"] = by_name[f"present.{i}.key"]
        new_past[f"past_key_values.{i}.value"] = by_name[f"present.{i}.value"]
    return by_name["logits"], new_past


def prefill(session: Any, manifest: ModelManifest, ids: Sequence[int], *,
            all_logits: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One prompt from an empty past; logits [1, vocab] of its last token, or [n, vocab] with all_logits."""
    n = len(ids)
    positions = np.arange(n) if all_logits else np.asarray([n - 1])
    return run_step(session, manifest, np.asarray([list(ids)], np.int64), np.asarray([n - 1]), positions,
                    empty_past(manifest, 1, kv_dtype(session)))


def decode_step(session: Any, manifest: ModelManifest, token: int, total: int,
                past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One token at position total - 1 over a past of total - 1 tokens; logits [1, vocab]."""
    return run_step(session, manifest, np.asarray([[token]], np.int64), np.asarray([total - 1]), np.asarray([0]),
                    past)


def greedy_with_session(
    session: Any,
    manifest: ModelManifest,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    stop_on_eos: bool = True,
) -> list[int]:
    """The greedy loop over an open session (the converter checks a model before it is in place)."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    eos = set(manifest.eos_token_ids)
    total = len(prompt_ids)
    logits, past = prefill(session, manifest, prompt_ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(logits[-1]))
        if stop_on_eos and token in eos:
            break
        out.append(token)
        if len(out) == max_new_tokens or total >= manifest.context_length:
            break
        total += 1
        logits, past = decode_step(session, manifest, token, total, past)
    return out


def greedy_generate(
    model_dir: Path | str,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    variant: str = "",
    stop_on_eos: bool = True,
) -> list[int]:
    """Greedy-decodes up to max_new_tokens after prompt_ids; the eos token itself is not returned."""
    manifest = ModelManifest.load(model_dir, variant=variant)
    session = load_session(model_dir, variant=variant)
    return greedy_with_session(session, manifest, prompt_ids, max_new_tokens, stop_on_eos=stop_on_eos)


def load_tokenizer(model_dir: Path | str) -> Any:
    from tokenizers import Tokenizer

    manifest = ModelManifest.load(model_dir)
    return Tokenizer.from_file(str(manifest.tokenizer_path(model_dir)))


def render_chat(
    manifest: ModelManifest, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """Renders the model's own chat template (sandboxed Jinja, as transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(manifest.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


def chat_prompt_ids(model_dir: Path | str, user_message: str) -> list[int]:
    """Token ids of a one-turn chat (template default system prompt) ready for generation."""
    manifest = ModelManifest.load(model_dir)
    text = render_chat(manifest, [{"role": "user", "content": user_message}])
    # The template already contains the special tokens; no extra BOS/EOS.
    return list(load_tokenizer(model_dir).encode(text, add_special_tokens=False).ids)


def main(argv: list[str] | None = None) -> int:
    from services.common.config import lmesh_cache

    parser = argparse.ArgumentParser(prog="python -m services.model.reference", description=__doc__)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--variant", default="", choices=["", "int8", "fp16"], help="a variant's model instead of fp32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        prompt = chat_prompt_ids(args.dir, args.prompt)
        t0 = time.perf_counter()
        load_session(args.dir, variant=args.variant)
        t1 = time.perf_counter()
        answer = greedy_generate(args.dir, prompt, args.max_new_tokens, variant=args.variant)
        t2 = time.perf_counter()
        # Throughput over a fixed length, eos ignored, so runs are comparable.
        forced = greedy_generate(args.dir, prompt, args.max_new_tokens, variant=args.variant, stop_on_eos=False)
        t3 = time.perf_counter()
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = load_tokenizer(args.dir).decode(answer, skip_special_tokens=True)
    print(text)
    print(
        f"session load {t1 - t0:.2f}s; answer {len(answer)} tokens in {t2 - t1:.2f}s; "
        f"{len(forced)} tokens (prompt {len(prompt)}) in {t3 - t2:.2f}s "
        f"= {len(forced) / (t3 - t2):.1f} tok/s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

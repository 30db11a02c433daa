"""A short fine-tune of SmolLM2-135M-Instruct for lmesh's tool path (plan JSON, answer from the results), on CPU.

    python -m services.model.finetune --base DIR --out DIR [--steps N] [--lr LR] [--force]

`--base` is the model build of services.model.convert (its `hf/` weights, tokenizer.json and manifest). The data
are synthetic (services.model.tool_data: the gateway's own prompts, real tool outputs, a fixed seed unlike the
calculator bench's) plus self-distilled plain chats (the base model's own greedy answers to ordinary requests, so
the tuned model forgets less). Loss only on the assistant's tokens and its <|im_end|>. The result is exported to
ONNX with the converter's own graph writer and checked against torch the same way, and registered as a model of its
own, `smollm2-135m-tools` version 1, whose manifest's `source` names the base, the data seed and the steps. A second
run with the same inputs finds the finished build and does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.model.convert import HF_DIR, MODEL_FILE, TOKENIZER_FILE, ConversionError, _tmp_path
from services.model.manifest import ManifestError, ModelManifest, ModelSource
from services.model.tool_data import CHAT_PROMPTS, DATA_SEED, Example, tool_examples

MODEL_NAME = "smollm2-135m-tools"
MODEL_VERSION = "1"
TRAIN_SEED = 20260601
DEFAULT_STEPS = 80
DEFAULT_LR = 1e-4
# The lower layers stay as they are: no backward through them (the build is ~1.7x faster) and less to forget.
FROZEN_LAYERS = 18
BATCH = 8
WARMUP = 8
TOOL_EXAMPLES = 2000  # the pool steps draw from (in order, then again)
CHAT_SHARE = 8  # one plain chat example in every CHAT_SHARE
DISTIL_TOKENS = 64
DISTIL_PROMPTS = 40
IM_END = "<|im_end|>"
LOG_EVERY = 5
RECIPE_FILE = "finetune_recipe.json"


def source_record(base: ModelManifest, steps: int, lr: float) -> str:
    """What a build is made from, as one string: the base's own source hash, the data seed, the recipe."""
    recipe = {"base": f"{base.name}:{base.version}", "base_sha256": base.source.sha256, "data_seed": DATA_SEED,
              "train_seed": TRAIN_SEED, "steps": steps, "lr": lr, "batch": BATCH, "examples": TOOL_EXAMPLES,
              "frozen_layers": FROZEN_LAYERS, "distil": [DISTIL_PROMPTS, DISTIL_TOKENS], "recipe_version": 1}
    return json.dumps(recipe, sort_keys=True)


def recipe_sha(record: str) -> str:
    return hashlib.sha256(record.encode()).hexdigest()


def tuned_source(base: ModelManifest, record: str) -> ModelSource:
    """The manifest's `source`: what it was built from in short (the registry keeps it as a label of at most 256
    characters; the whole recipe is RECIPE_FILE), keyed by the recipe's hash."""
    recipe = json.loads(record)
    return ModelSource(file=f"{recipe['base']} base_sha256={base.source.sha256[:16]} data_seed={recipe['data_seed']} "
                            f"steps={recipe['steps']} lr={recipe['lr']:g}", sha256=recipe_sha(record))


def cached_tuned(out_dir: Path, record: str) -> ModelManifest | None:
    """The manifest of a finished build of the same recipe in out_dir, or None."""
    try:
        manifest = ModelManifest.load(out_dir)
    except ManifestError:
        return None
    if manifest.name != MODEL_NAME or manifest.source.sha256 != recipe_sha(record):
        return None
    if not (manifest.model_path(out_dir).is_file() and manifest.tokenizer_path(out_dir).is_file()):
        return None
    return manifest


# --------------------------------------------------------------------------- tokenization


class Encoder:
    """The manifest's chat template (rendered as services/tokenizer does) and the model's tokenizer.json."""

    def __init__(self, base_dir: Path, manifest: ModelManifest) -> None:
        from tokenizers import Tokenizer

        from services.tokenizer.text import compile_chat_template

        self.template = compile_chat_template(manifest.chat_template)
        self.tokenizer = Tokenizer.from_file(str(manifest.tokenizer_path(base_dir)))
        im_end = self.tokenizer.token_to_id(IM_END)
        if im_end is None:
            raise ConversionError(f"the tokenizer has no {IM_END} token: not a SmolLM2 build")
        self.im_end: int = im_end

    def prompt_ids(self, messages: list[tuple[str, str]]) -> list[int]:
        text = self.template.render(messages=[{"role": r, "content": c} for r, c in messages],
                                    add_generation_prompt=True, tools=None, documents=None)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def example_ids(self, example: Example) -> tuple[list[int], list[int]]:
        """(input ids, labels): the prompt as inference tokenizes it, then the target's own tokens (what the model
        generates after it), then <|im_end|> for a complete turn; labels -100 on the prompt."""
        prompt = self.prompt_ids(example.messages)
        target = list(self.tokenizer.encode(example.target, add_special_tokens=False).ids)
        if example.complete:
            target.append(self.im_end)
        return prompt + target, [-100] * len(prompt) + target


# --------------------------------------------------------------------------- torch


def _load_hf(base_dir: Path) -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(base_dir / HF_DIR), dtype=torch.float32)
    return model


def distil_chats(model: Any, encoder: Encoder) -> list[Example]:
    """The base model's greedy answers to CHAT_PROMPTS, unchanged (a cut answer trains no <|im_end|>)."""
    import torch

    examples = []
    model.eval()
    with torch.no_grad():
        for prompt in CHAT_PROMPTS[:DISTIL_PROMPTS]:
            messages = [("user", prompt)]
            ids = torch.tensor([encoder.prompt_ids(messages)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DISTIL_TOKENS,
                                 do_sample=False, eos_token_id=encoder.im_end, pad_token_id=encoder.im_end)
            new = out[0, ids.shape[1]:].tolist()
            complete = bool(new) and new[-1] == encoder.im_end
            text = encoder.tokenizer.decode(new[:-1] if complete else new, skip_special_tokens=False)
            examples.append(Example("chat", messages, text, complete=complete))
    return examples


def schedule(tools: list[Example], chats: list[Example], steps: int) -> list[list[Example]]:
    """Each step's batch: tool examples in their fixed order, one chat example in every CHAT_SHARE slots."""
    rng = random.Random(TRAIN_SEED)
    batches, t, c = [], 0, 0
    chat_order = list(chats)
    rng.shuffle(chat_order)
    for _ in range(steps):
        batch = []
        for _ in range(BATCH):
            if chat_order and rng.randrange(CHAT_SHARE) == 0:
                batch.append(chat_order[c % len(chat_order)])
                c += 1
            else:
                batch.append(tools[t % len(tools)])
                t += 1
        batches.append(batch)
    return batches


def train(model: Any, encoder: Encoder, batches: list[list[Example]], lr: float) -> list[float]:
    """AdamW over the layers above FROZEN_LAYERS and the final norm (not the tied embedding); logits only where a
    label is, so lm_head costs little."""
    import torch
    from tqdm import tqdm

    model.train()
    model.config.use_cache = False
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(False)
    for layer in model.model.layers[:FROZEN_LAYERS]:
        layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    total = len(batches)

    def factor(step: int) -> float:  # linear warmup, then linear decay to 10%
        if step < WARMUP:
            return (step + 1) / WARMUP
        return max(0.1, 1 - 0.9 * (step - WARMUP) / max(1, total - WARMUP))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses: list[float] = []
    bar = tqdm(batches, desc="finetune", unit="step", file=sys.stderr, mininterval=30)
    for step, batch in enumerate(bar):
        encoded = [encoder.example_ids(e) for e in batch]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(batch), width), encoder.im_end, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(encoded):  # right padding, masked
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            labels[row, :len(row_labels)] = torch.tensor(row_labels)
            mask[row, :len(row_ids)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        shifted = labels[:, 1:]
        picked = shifted != -100
        logits = model.lm_head(hidden[:, :-1][picked])
        loss = torch.nn.functional.cross_entropy(logits.float(), shifted[picked])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == total:
            recent = losses[-LOG_EVERY:]
            bar.write(f"step {step + 1}/{total} loss {sum(recent) / len(recent):.4f} "
                      f"lr {scheduler.get_last_lr()[0]:.2e}", file=sys.stderr)
    model.eval()
    model.config.use_cache = True
    return losses


# --------------------------------------------------------------------------- build


def build_tuned(base_dir: Path, out_dir: Path, *, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                force: bool = False, examples: int | None = None) -> Path:
    base_dir, out_dir = Path(base_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    try:
        base = ModelManifest.load(base_dir)
    except ManifestError as exc:
        raise ConversionError(f"no base model at {base_dir}: {exc}; run `make model`") from None
    if not (base_dir / HF_DIR / "config.json").is_file():
        raise ConversionError(f"{base_dir} has no {HF_DIR}/ weights: rebuild it with `make model`")
    record = source_record(base, steps, lr)
    if not force and cached_tuned(out_dir, record) is not None:
        print(f"tuned model cached at {out_dir}")
        return out_dir

    import torch

    started = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(TRAIN_SEED)
    random.seed(TRAIN_SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "lmesh_model.json",):  # a crash must not leave a directory that looks complete
        stale.unlink(missing_ok=True)

    encoder = Encoder(base_dir, base)
    model = _load_hf(base_dir)
    print("distilling plain chats from the base model", file=sys.stderr)
    chats = distil_chats(model, encoder)
    tools = tool_examples(examples or TOOL_EXAMPLES)
    losses = train(model, encoder, schedule(tools, chats, steps), lr)
    trained_s = time.perf_counter() - started

    manifest = dataclasses.replace(
        base, name=MODEL_NAME, version=MODEL_VERSION, model_file=MODEL_FILE, tokenizer_file=TOKENIZER_FILE,
        dtype="float32", source=tuned_source(base, record))
    (out_dir / RECIPE_FILE).write_text(record + "\n")
    _export(model, base_dir, out_dir, manifest)
    first = sum(losses[:LOG_EVERY]) / max(1, len(losses[:LOG_EVERY]))
    last = sum(losses[-LOG_EVERY:]) / max(1, len(losses[-LOG_EVERY:]))
    print(f"tuned model built at {out_dir} in {time.perf_counter() - started:.0f}s (training {trained_s:.0f}s, "
          f"{steps} steps, loss {first:.3f} -> {last:.3f})")
    return out_dir


def _export(model: Any, base_dir: Path, out_dir: Path, manifest: ModelManifest) -> None:
    """hf/ weights, model.onnx (the converter's graph writer, checked against torch by its _verify), the base's
    tokenizer.json, then the manifest last (its presence means the build is complete)."""
    from transformers import AutoTokenizer

    from services.model.convert import _export_onnx, _replace_dir, _verify

    hf_tmp = _tmp_path(out_dir / HF_DIR)
    if hf_tmp.exists():
        shutil.rmtree(hf_tmp)
    model.save_pretrained(hf_tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base_dir / HF_DIR / name).is_file():
            shutil.copy2(base_dir / HF_DIR / name, hf_tmp / name)
    _replace_dir(hf_tmp, out_dir / HF_DIR)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir / HF_DIR))
    onnx_tmp = _tmp_path(out_dir / MODEL_FILE)
    try:
        _export_onnx(model, out_dir, onnx_tmp)
        diff = _verify(model, tokenizer, manifest, onnx_tmp)
        os.replace(onnx_tmp, out_dir / MODEL_FILE)
    finally:
        onnx_tmp.unlink(missing_ok=True)
    shutil.copy2(base_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    manifest.save(out_dir)
    print(f"ONNX export verified against torch (max |logits diff| {diff:.2g})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.model.finetune", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the base model directory (make model)")
    parser.add_argument("--out", type=Path, required=True, help="where the tuned model goes")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps of {BATCH} examples")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate")
    parser.add_argument("--force", action="store_true", help="rebuild even if the same build is cached")
    parser.add_argument("--check", action="store_true", help="exit 0 if the build is cached, 1 if not (no torch)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.check:
        try:
            base = ModelManifest.load(args.base)
        except ManifestError:
            return 1
        return 0 if cached_tuned(args.out, source_record(base, args.steps, args.lr)) is not None else 1
    try:
        build_tuned(args.base, args.out, steps=args.steps, lr=args.lr, force=args.force)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}; check that the output directory is writable and has ~1 GB free", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

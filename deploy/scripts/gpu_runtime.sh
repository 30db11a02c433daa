#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, swaps onnxruntime for onnxruntime-gpu of the same version (with the CUDA and
# cuDNN libraries it needs, from PyPI), so inference runs on the CUDA execution provider. When that build cannot
# start CUDA here, the CPU build is put back and a one-line warning says so. LMESH_GPU=0 skips all of it.
# usage: gpu_runtime.sh VENV_BIN
set -euo pipefail
bin=$1
if [[ "${LMESH_GPU:-auto}" == 0 ]] || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  exit 0
fi
# A session on a one-node model must come up on CUDA: listing the provider is not enough (it is compiled in
# even when the CUDA libraries are missing).
cuda_works='
import sys, onnx, onnxruntime as ort
from onnx import TensorProto, helper
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
sys.exit(0 if session.get_providers()[0] == "CUDAExecutionProvider" else 1)
'
if "$bin/python" -c "$cuda_works" >/dev/null 2>&1; then
  exit 0  # onnxruntime-gpu already runs here
fi
version=$("$bin/python" -c 'import importlib.metadata as m; print(m.version("onnxruntime"))')
echo "• NVIDIA GPU found: installing onnxruntime-gpu==$version with its CUDA libraries"
"$bin/pip" uninstall -q -y onnxruntime
if "$bin/pip" install -q "onnxruntime-gpu[cuda,cudnn]==$version" && "$bin/python" -c "$cuda_works" >/dev/null 2>&1
then
  echo "• inference will run on the CUDA execution provider (serve the fp16 variant there; see README)"
else
  echo "lmesh: onnxruntime-gpu==$version cannot start CUDA on this machine; keeping the CPU build" \
       "(LMESH_GPU=0 skips this check)" >&2
  "$bin/pip" uninstall -q -y onnxruntime-gpu || true
  "$bin/pip" install -q "onnxruntime==$version"
fi

"""`make bench`: lmesh inference against a plain ONNX Runtime loop and onnxruntime-genai, on this machine.

`python -m bench.run --model-dir DIR [--quick] [--profile]` prints one markdown table (throughput, time to
first token, inter-token latency, peak memory) and the target checks, and writes the same as JSON to
`$LMESH_CACHE/bench/latest.json`. Not part of `make test`.
"""

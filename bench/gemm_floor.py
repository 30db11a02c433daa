"""How fast a decode step could possibly be on this machine: the model's matrix products alone, nothing else.

Reads the weight shapes of every MatMul/Gemm in the built graph (not the weights), then times those products,
with random weights of the same shapes and precision, in one ONNX Runtime session with the engine's thread
settings, for M rows (M = the number of streams decoding together). A decode step also runs attention, norms,
the sampler and the I/O, so its real time is above this floor; at 16 streams the floor bounds tokens/s from
above by 16 / floor. The last line compares that bound with onnxruntime-genai's measured batch of 16 (from the
latest `make bench`, when there is one).

usage: python -m bench.gemm_floor [--model-dir DIR] [--rows 1 16 32 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from services.common.config import lmesh_cache


def weight_shapes(model_path: Path) -> list[tuple[int, int]]:
    """(K, N) of every matrix product with a weight: the graph's MatMul and Gemm nodes, read without the data."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    dims = {init.name: tuple(init.dims) for init in model.graph.initializer}
    shapes: list[tuple[int, int]] = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in dims:
            continue
        k, n = dims[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        shapes.append((n, k) if trans_b else (k, n))
    return shapes


def products_session(shapes: list[tuple[int, int]], threads: int) -> tuple[object, list[int]]:
    """A session that runs every product once on inputs x<K> [M, K]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ks = sorted({k for k, _ in shapes})
    nodes, weights, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["m", k]) for k in ks]
    graph = helper.make_graph(nodes, "gemm_floor", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), ks


def products_seconds(session: object, ks: list[int], rows: list[int], repeats: int = 10) -> dict[int, float]:
    """Seconds one run of every product takes for each row count (after one untimed run at that shape)."""
    rng = np.random.default_rng(1)
    result = {}
    for m in rows:
        feeds = {f"x{k}": rng.standard_normal((m, k), dtype=np.float32) for k in ks}
        session.run(None, feeds)  # type: ignore[attr-defined]
        began = time.perf_counter()
        for _ in range(repeats):
            session.run(None, feeds)  # type: ignore[attr-defined]
        result[m] = (time.perf_counter() - began) / repeats
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    threads = int(os.environ.get("LMESH_ORT_THREADS", os.cpu_count() or 1))
    shapes = weight_shapes(args.model_dir / "model.onnx")
    flops_per_row = sum(2 * k * n for k, n in shapes)
    session, ks = products_session(shapes, threads)
    print(f"{len(shapes)} matrix products, {flops_per_row / 1e9:.2f} GFLOP per row, {threads} threads (float32)")
    print("| rows | products alone, ms per step | GFLOP/s | tokens/s bound (rows / step) |")
    print("|--:|--:|--:|--:|")
    floor_16 = None
    for rows, step in products_seconds(session, ks, args.rows, args.repeats).items():
        if rows == 16:
            floor_16 = step
        print(f"| {rows} | {step * 1e3:.1f} | {rows * flops_per_row / step / 1e9:.0f} | {rows / step:.0f} |")
    latest = lmesh_cache() / "bench" / "latest.json"
    if floor_16 is not None and latest.exists():
        rows_by_name = {(r.get("system"), r.get("streams")): r for r in json.loads(latest.read_text()).get("rows", [])}
        genai = rows_by_name.get(("onnxruntime-genai (static batch)", 16))
        if genai is not None:
            bound, peer = 16 / floor_16, genai["tokens_per_s"]
            print(f"\n16 streams: at most {bound:.0f} tok/s from the products alone; onnxruntime-genai's batch of 16 "
                  f"made {peer:.0f} tok/s in the latest make bench: the bound is {bound / peer:.2f}x it")


if __name__ == "__main__":
    main()

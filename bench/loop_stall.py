"""How long a version load holds a service's event loop: the worst lag of a 2 ms ticker on the loop while the load
runs in a worker thread, as the services run it.

A Consul check answers on that loop, within 1 s: a library call that holds the GIL longer (on a loaded machine a
few hundred milliseconds stretch past it) takes the instance out of the mesh for a moment. Rows: the tokenizer
service's and the gateway's load of a version (`load_tokenizer`), first as a new tokenizer artifact, then as a
second version of the same artifact (sharing the parse) and, for comparison, the same version parsed again; the
replica's llguidance compiler (`GrammarCache`), read once, then found for a second version.

usage: python -m bench.loop_stall [--model-dir DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from lmesh.registry.v1 import registry_pb2

from services.common.config import lmesh_cache
from services.inference.loader import GrammarCache
from services.tokenizer.loader import LoadedTokenizers, load_tokenizer

T = TypeVar("T")
TICK_S = 0.002


async def worst_lag_ms(work: Awaitable[T]) -> tuple[float, T]:
    """`work`'s result, and the longest the loop was late for a 2 ms sleep while it ran."""
    worst, done = 0.0, False

    async def tick() -> None:
        nonlocal worst
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(TICK_S)
            worst = max(worst, time.perf_counter() - start - TICK_S)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    try:
        result = await work
    finally:
        done = True
        await ticker
    return 1000 * worst, result


async def one_run(tokenizer_json: Path, sha256: str) -> dict[str, float]:

    def version(name: str) -> registry_pb2.ModelVersion:
        return registry_pb2.ModelVersion(
            name="model", version=name, chat_template="{{ messages[0]['content'] }}", eos_token_ids=[2],
            artifacts=[registry_pb2.Artifact(kind=registry_pb2.ARTIFACT_KIND_TOKENIZER, sha256=sha256)])

    async def fetch(_: str) -> Path:
        return tokenizer_json

    loaded = LoadedTokenizers()
    lags: dict[str, float] = {}
    lags["tokenizer, a new artifact"], first = await worst_lag_ms(load_tokenizer(version("1"), fetch, loaded))
    lags["tokenizer, a second version of it"], second = await worst_lag_ms(
        load_tokenizer(version("1-int8"), fetch, loaded))
    assert second.tokenizer is first.tokenizer
    lags["tokenizer, the same parsed again"], _ = await worst_lag_ms(load_tokenizer(version("1-int8"), fetch))
    grammars = GrammarCache()
    lags["llguidance, a new artifact"], _ = await worst_lag_ms(grammars.get(sha256, [2], tokenizer_json, "model:1"))
    lags["llguidance, a second version of it"], _ = await worst_lag_ms(
        grammars.get(sha256, [2], tokenizer_json, "model:1-int8"))
    return lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tokenizer_json = args.model_dir / "tokenizer.json"
    sha256 = hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
    runs = [asyncio.run(one_run(tokenizer_json, sha256)) for _ in range(args.runs)]
    print(f"worst event-loop lag while a load runs in a worker thread, ms ({args.runs} runs)")
    print("| load | min | max |")
    print("| --- | --: | --: |")
    for row in runs[0]:
        values = [run[row] for run in runs]
        print(f"| {row} | {min(values):.0f} | {max(values):.0f} |")


if __name__ == "__main__":
    main()

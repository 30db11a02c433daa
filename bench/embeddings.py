"""What lmesh-embeddings' micro-batcher buys: texts/s and latency of single-text Embed calls one after another,
32 concurrent single-text calls, and one call carrying 32 texts, over gRPC to the service (a process of its own)
found through a real Consul agent (mTLS off: this measures the model and the batching, not the mesh's TLS).

Every text is distinct and the service's cache is off, so every text runs the model. The rounds alternate
(sequential, concurrent, one call, ...) so that a shared machine's background load falls on all alike; the
figures are medians over rounds.

  python -m bench.embeddings [--model-dir DIR] [--rounds 5] [--concurrency 32] [--threads 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import machine, percentile
from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.server import start_service
from services.embeddings.main import EmbeddingsSettings, build
from services.embeddings.manifest import default_model_dir

ROOT = Path(__file__).resolve().parent.parent

# Like tool descriptions and requests: 10 to 20 wordpieces each.
TEMPLATE = "request {i}: which tool lists the open issues of project {i} sorted by their priority?"


@dataclass
class Mode:
    """One way of calling: per round its wall time and texts, and every call's latency."""

    wall_s: list[float] = field(default_factory=list)
    texts: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def texts_per_s(self) -> float:
        return statistics.median(n / s for n, s in zip(self.texts, self.wall_s, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {"texts_per_s": round(self.texts_per_s(), 1), "p50_ms": round(percentile(self.latencies_ms, 50), 2),
                "p90_ms": round(percentile(self.latencies_ms, 90), 2),
                "round_ms": round(statistics.median(self.wall_s) * 1000, 1), "calls": len(self.latencies_ms)}


async def measure(model_dir: Path, rounds: int, concurrency: int, threads: int) -> dict[str, Any]:
    from lmesh.embeddings.v1 import embeddings_pb2 as epb
    from lmesh.embeddings.v1 import embeddings_pb2_grpc

    counter = iter(range(10**9))

    def texts(n: int) -> list[str]:
        return [TEMPLATE.format(i=next(counter)) for _ in range(n)]

    with tempfile.TemporaryDirectory(prefix="lmesh-bench-embeddings-") as scratch:
        work = Path(scratch)
        agent = await asyncio.to_thread(ConsulAgent.start, None, work / "consul.log")
        # The service in a process of its own, as deployed: the client's calls do not share its event loop.
        server = subprocess.Popen([sys.executable, "-m", "bench.embeddings", "--serve", agent.http_addr,  # noqa: ASYNC220 (returns at once)
                                   "--model-dir", str(model_dir), "--threads", str(threads),
                                   "--data-dir", str(work / "data")],
                                  cwd=ROOT, env={**os.environ, "LMESH_MTLS": "off"},
                                  stdout=subprocess.PIPE, text=True)
        mesh = Mesh(agent.http_addr)
        try:
            endpoint = await mesh.resolver("lmesh-embeddings").wait_for(lambda e: True, timeout=120)
            stub = endpoint.stub(embeddings_pb2_grpc.EmbeddingsStub)

            async def call(batch: list[str], into: Mode) -> None:
                started = time.perf_counter()
                await stub.Embed(epb.EmbedRequest(inputs=batch), timeout=60)
                into.latencies_ms.append((time.perf_counter() - started) * 1000)

            async def timed(mode: Mode, n: int, run: Any) -> None:
                started = time.perf_counter()
                await run
                mode.wall_s.append(time.perf_counter() - started)
                mode.texts.append(n)

            async def one_after_another(mode: Mode) -> None:
                for text in texts(concurrency):
                    await call([text], mode)

            for _ in range(3):  # warm up: the channel, ORT's first runs at these shapes
                await call(texts(1), Mode())
                await asyncio.gather(*(call([t], Mode()) for t in texts(concurrency)))
            modes = {"sequential": Mode(), "concurrent": Mode(), "one_call": Mode()}
            for _ in range(rounds):
                await timed(modes["sequential"], concurrency, one_after_another(modes["sequential"]))
                await timed(modes["concurrent"], concurrency,
                            asyncio.gather(*(call([t], modes["concurrent"]) for t in texts(concurrency))))
                await timed(modes["one_call"], concurrency, call(texts(concurrency), modes["one_call"]))
        finally:
            server.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(server.communicate, timeout=30)
            await mesh.close()
            await asyncio.to_thread(agent.stop)
    sizes = json.loads(out.strip().splitlines()[-1]) if out.strip() else [0]
    sequential, concurrent = modes["sequential"], modes["concurrent"]
    return {
        "machine": machine(), "rounds": rounds, "concurrency": concurrency, "threads": threads or "all cores",
        "modes": {name: mode.to_json() for name, mode in modes.items()},
        # 32 concurrent single-text calls against 32 times one call alone (its p50).
        "concurrent_vs_32_single": round(statistics.median(concurrent.wall_s)
                                         / (concurrency * percentile(sequential.latencies_ms, 50) / 1000), 3),
        "batch_sizes_seen": {"largest": max(sizes), "mean": round(statistics.fmean(sizes), 1)},
    }


async def serve(consul_addr: str, model_dir: Path, threads: int, data_dir: Path) -> None:
    """The service (cache off) until SIGTERM; then prints the sizes of the batches it ran, as JSON."""
    settings = EmbeddingsSettings(model_dir=model_dir, threads=threads, cache_entries=0)
    config = ServiceConfig(service="embeddings", mtls=False, consul_addr=consul_addr, data_dir=data_dir, grace_s=1,
                           settings=settings)
    service = await start_service(config, build)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    sizes = service.parts.extra["batcher"].stats.batch_sizes
    await service.stop()
    print(json.dumps(sizes), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: $LMESH_CACHE/models/all-minilm-l6-v2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--serve", metavar="CONSUL_ADDR", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve, args.model_dir or default_model_dir(), args.threads, args.data_dir))
        return 0
    result = asyncio.run(measure(args.model_dir or default_model_dir(), args.rounds, args.concurrency, args.threads))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

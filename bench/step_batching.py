"""What sending a decode step's tokens as one message would save: gRPC's own CPU for N streams that each get a
one-token message per step (as `Generate` answers today), against one stream that gets one N-token message per
step (as a stream shared by every chat of a gateway on a replica would).

A bare grpc-aio server and client in two processes, with lmesh's own messages (`GenerateResponse` holding
`TokenChunk`s), over TLS as the mesh's hops are (a self-signed certificate made here). The server sends a step
every `--step-ms` (the engine's pace), the client reads every message; each side's CPU per step comes from
`getrusage` in its own process. The two ways alternate, `--rounds` times; medians.

  python -m bench.step_batching [--streams 16] [--steps 64] [--step-ms 30] [--rounds 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from bench.stats import machine
from services.common.peers import INFERENCE, direct_stub

WAYS = ("per-stream", "per-step")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for `localhost` and its key, made with the openssl command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True, timeout=60)
    return cert, key


def step_message(tokens: int) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(tokens=inference_pb2.TokenChunk(tokens=[
        generation_pb2.TokenLogprob(token_id=1000 + i, logprob=-0.5) for i in range(tokens)]))


class StepServer(inference_pb2_grpc.InferenceServicer):
    """Each `Generate` gets `steps` messages of `tokens_per_message` tokens, one per tick."""

    def __init__(self, steps: int, tokens_per_message: int, streams: int) -> None:
        self.ticks: list[asyncio.Queue[None]] = []
        self.all_open = asyncio.Event()
        self._streams = streams
        self._steps = steps
        self._message = step_message(tokens_per_message)

    async def Generate(self, request_iterator: Any, context: Any) -> Any:
        await anext(request_iterator)
        tick: asyncio.Queue[None] = asyncio.Queue()
        self.ticks.append(tick)
        if len(self.ticks) == self._streams:
            self.all_open.set()
        for _ in range(self._steps):
            await tick.get()
            yield self._message


async def serve(way: str, args: argparse.Namespace, cert: Path, pair: tuple[bytes, bytes]) -> dict[str, float]:
    streams = args.streams if way == "per-stream" else 1
    servicer = StepServer(args.steps, 1 if way == "per-stream" else args.streams, streams)
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    await server.start()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.step_batching", "--client", str(port), "--client-streams", str(streams),
        "--cert", str(cert), stdout=subprocess.PIPE)
    try:
        await servicer.all_open.wait()
        began = cpu_s()
        for _ in range(args.steps):
            for tick in servicer.ticks:
                tick.put_nowait(None)
            await asyncio.sleep(args.step_ms / 1000)
        server_ms = (cpu_s() - began) * 1000 / args.steps
        out, _ = await client.communicate()
        measured = json.loads(out)
    finally:
        await server.stop(None)
    if measured["tokens"] != args.streams * args.steps:
        raise SystemExit(f"{way}: the client read {measured['tokens']} tokens, not {args.streams * args.steps}")
    return {"server_cpu_ms_per_step": server_ms, "client_cpu_ms_per_step": measured["cpu_s"] * 1000 / args.steps}


async def read_all(port: int, streams: int, root_pem: bytes) -> None:
    async with direct_stub(INFERENCE, f"localhost:{port}", grpc.ssl_channel_credentials(root_pem)) as stub:
        calls = [stub.Generate() for _ in range(streams)]
        for call in calls:
            await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(model="m")))

        async def tokens(call: Any) -> int:
            made = 0
            async for response in call:
                made += len(response.tokens.tokens)
            return made

        first = await asyncio.gather(*(anext(aiter(call)) for call in calls))  # every stream open
        began = cpu_s()
        made = sum(await asyncio.gather(*(tokens(call) for call in calls)))
        spent = cpu_s() - began
    print(json.dumps({"tokens": made + sum(len(r.tokens.tokens) for r in first), "cpu_s": spent}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_batching.json"))
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(read_all(args.client, args.client_streams, args.cert.read_bytes()))
        return
    rounds: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as folder:
        cert, key = self_signed(Path(folder))
        pair = (key.read_bytes(), cert.read_bytes())
        for round_ in range(args.rounds):
            for way in WAYS if round_ % 2 == 0 else reversed(WAYS):
                rounds[way].append(asyncio.run(serve(way, args, cert, pair)))
    summary = {way: {side: statistics.median(r[side] for r in rounds[way])
                     for side in ("server_cpu_ms_per_step", "client_cpu_ms_per_step")} for way in WAYS}
    saved = {side: summary["per-stream"][side] - summary["per-step"][side] for side in summary["per-stream"]}
    print(f"{args.streams} streams, a step every {args.step_ms:g} ms, {args.steps} steps, TLS; CPU ms per step "
          f"(medians of {args.rounds} rounds)")
    print("| way | server (the replica) | client (the gateway) |\n| --- | --: | --: |")
    for way, sides in summary.items():
        print(f"| {way} | {sides['server_cpu_ms_per_step']:.2f} | {sides['client_cpu_ms_per_step']:.2f} |")
    both = sum(saved.values())
    print(f"one message per step would save {both:.2f} ms of CPU per step ({both / args.streams:.3f} ms a token)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "streams": args.streams, "steps": args.steps,
                                    "step_ms": args.step_ms, "rounds": rounds, "medians": summary,
                                    "saved_cpu_ms_per_step": saved}, indent=1) + "\n")


if __name__ == "__main__":
    main()

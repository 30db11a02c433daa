"""What the OpenAI-compatible HTTP API costs next to gRPC: one mesh (gateway, policy, registry, tokenizer, inference
as separate processes), the same chats sent through the gateway's gRPC `Chat` and its HTTP API, in turns.

Three clients, so the gateway's cost is told apart from the client's (all share this machine's cores):
  grpc  the gRPC API (as bench.mesh_tls);
  http  POST /v1/chat/completions streamed, read as raw Server-Sent Events (httpx2, no parsing past the lines);
  sdk   the same through the official `openai` SDK (a pydantic object per chunk).
For each batch of `--streams` concurrent chats: tokens/s, and the gateway process's CPU seconds per 1000 tokens
(from /proc). Then the per-request overhead: `--requests` one-token chats one after another, median latency each
way (HTTP with a kept-alive connection, gRPC on one channel).

  python -m bench.openai_http --model-dir DIR [--rounds 4] [--streams 16] [--max-tokens 64] [--requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2
import openai
from lmesh.gateway.v1 import gateway_pb2
from openai.types.chat import ChatCompletionUserMessageParam

from bench.full_mesh import full_mesh
from bench.mesh_tls import QUESTION
from services.common.config import lmesh_cache
from services.common.peers import public_gateway

MODES = ("grpc", "http", "sdk")
MESSAGES: list[ChatCompletionUserMessageParam] = [{"role": "user", "content": QUESTION}]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Clients:
    def __init__(self, grpc_target: str, http_base: str, key: str) -> None:
        self.grpc_target, self.key = grpc_target, key
        self.http = httpx2.AsyncClient(base_url=http_base, timeout=600,
                                       limits=httpx2.Limits(max_connections=64, max_keepalive_connections=64))
        self.sdk = openai.AsyncOpenAI(base_url=f"{http_base}/v1", api_key=key, max_retries=0, timeout=600)
        self.stub_context = public_gateway(grpc_target)

    async def __aenter__(self) -> Clients:
        self.stub = await self.stub_context.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stub_context.__aexit__(None, None, None)
        await self.http.aclose()
        await self.sdk.close()

    async def grpc(self, max_tokens: int) -> int:
        call = self.stub.Chat(metadata=(("authorization", f"Bearer {self.key}"),), timeout=600)
        await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
            max_tokens=max_tokens, messages=[gateway_pb2.Message(role="user", content=QUESTION)])))
        await call.done_writing()
        tokens = 0
        async for response in call:
            if response.HasField("usage"):
                tokens = response.usage.completion_tokens
        return tokens

    async def raw_http(self, max_tokens: int) -> int:
        body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        last = ""
        async with self.http.stream("POST", "/v1/chat/completions", json=body,
                                    headers={"authorization": f"Bearer {self.key}"}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    last = line
        return int(json.loads(last[6:])["usage"]["completion_tokens"])

    async def openai_sdk(self, max_tokens: int) -> int:
        stream = await self.sdk.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    def of(self, mode: str) -> Callable[[int], Awaitable[int]]:
        return {"grpc": self.grpc, "http": self.raw_http, "sdk": self.openai_sdk}[mode]


async def measure(model_dir: Path, rounds: int, streams: int, max_tokens: int, requests: int,
                  ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[float]]]:
    batches: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    latencies: dict[str, list[float]] = {"grpc": [], "http": []}
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-http-") as scratch:
        async with full_mesh(model_dir, Path(scratch)) as mesh:
            gateway_pid = mesh.pid("gateway")
            async with Clients(mesh.grpc_target, mesh.http_base, mesh.key) as clients:
                for mode in MODES:  # warm: caches, connections, the SDK's imports
                    await asyncio.gather(*(clients.of(mode)(8) for _ in range(streams)))
                for round_ in range(rounds):
                    order = MODES if round_ % 2 == 0 else MODES[::-1]
                    for mode in order:
                        cpu, began = cpu_seconds(gateway_pid), time.perf_counter()
                        tokens = sum(await asyncio.gather(*(clients.of(mode)(max_tokens) for _ in range(streams))))
                        elapsed, used = time.perf_counter() - began, cpu_seconds(gateway_pid) - cpu
                        batches[mode].append((tokens / elapsed, used / tokens * 1000))
                        print(f"  round {round_ + 1}, {mode}: {tokens / elapsed:.1f} tok/s, gateway "
                              f"{used / tokens * 1000:.2f} CPU s per 1000 tokens", file=sys.stderr, flush=True)
                for index in range(requests):
                    for mode in ("grpc", "http") if index % 2 == 0 else ("http", "grpc"):
                        began = time.perf_counter()
                        await clients.of(mode)(1)
                        latencies[mode].append((time.perf_counter() - began) * 1000)
    return batches, latencies


def render(batches: dict[str, list[tuple[float, float]]], latencies: dict[str, list[float]], streams: int,
           max_tokens: int) -> str:
    names = {"grpc": "gRPC Chat", "http": "HTTP, raw SSE (httpx2)", "sdk": "HTTP, openai SDK"}
    grpc_rate = statistics.median(rate for rate, _ in batches["grpc"])
    lines = [f"| {streams} streams x {max_tokens} tokens, through the gateway | tok/s, median | vs gRPC "
             "| gateway CPU s per 1000 tokens, median | batches (tok/s) |", "| --- | --: | --: | --: | --- |"]
    for mode in MODES:
        rate = statistics.median(r for r, _ in batches[mode])
        cpu = statistics.median(c for _, c in batches[mode])
        lines.append(f"| {names[mode]} | {rate:.1f} | {rate / grpc_rate:.3f}x | {cpu:.2f} | "
                     f"{', '.join(f'{r:.1f}' for r, _ in batches[mode])} |")
    grpc_ms, http_ms = statistics.median(latencies["grpc"]), statistics.median(latencies["http"])
    lines += ["", f"one-token chats one after another (median of {len(latencies['grpc'])} each): gRPC "
                  f"{grpc_ms:.1f} ms, HTTP {http_ms:.1f} ms: HTTP adds {http_ms - grpc_ms:+.1f} ms per request"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openai_http", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=4, help="batches per client, in turns (default 4)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=40, help="one-token chats each way (default 40)")
    args = parser.parse_args(argv)
    print(f"HTTP vs gRPC: one mesh, {args.rounds} batches per client, {args.streams} streams x {args.max_tokens} "
          "tokens", file=sys.stderr, flush=True)
    batches, latencies = asyncio.run(measure(args.model_dir, args.rounds, args.streams, args.max_tokens,
                                             args.requests))
    print(render(batches, latencies, args.streams, args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())

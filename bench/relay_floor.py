"""The floor under the mesh's time to first token: what one more grpc-aio process on the path costs before any
of the gateway's work, measured side by side with the gateway.

A *null relay* is the least a front door can be: a separate process with a plain gRPC port that takes
`Generate` and forwards it, message for message, to the inference replica over the mesh's mTLS (with the
gateway's identity), and relays every answer back. No authentication, guardrails, metrics or tracing. Variants
also make, before forwarding, the calls a front door of this mesh cannot skip: the prompt rendered by the
tokenizer (`ApplyChatTemplate`, answer unused), then policy's admission (`Reserve` of the bench key, settled
after the answer in a task of its own). One mesh, these ways, interleaved chat by chat, each single stream paired
with the direct call next to it:

  direct                Generate straight to the replica (as bench.mesh_tax)
  relay                 Generate through the null relay
  relay+render          the same, the relay rendering the prompt first
  relay+render+reserve  the same, then Reserve, one after the other
  relay+render+overlap  render, then Reserve while the prompt is forwarded; the answer is relayed once Reserve
                        admitted it (as the gateway's overlapped admission)
  relay+overlap         Reserve while the prompt is forwarded, no call to render (a front door that renders
                        in its own process, as the gateway does for short prompts)
  gateway               the gateway's gRPC Chat (the whole mesh: key, guardrails, rendering, admission, routing,
                        detokenizing, metrics, tracing)
  gateway, no overlap   a second gateway on the same mesh, with `--overlap-admission off`
  gateway, tokenizer renders  a third one, with `--local-render off` (lmesh-tokenizer renders every prompt)

With --max-tokens above 1 it also gives each way's time per token after the first, paired with direct: what
relaying each decode step costs.

  python -m bench.relay_floor [--model-dir DIR] [--chats 60] [--max-tokens 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from lmesh.policy.v1 import policy_pb2
from lmesh.tokenizer.v1 import tokenizer_pb2

from bench.full_mesh import RunningMesh, full_mesh
from bench.mesh_tax import PROMPT_BOUND, Stream, Ways, input_only_rules, rendered_prompts
from bench.prompts import QUESTIONS
from bench.stats import machine, percentile
from services.common.config import lmesh_cache
from services.common.consul_agent import free_port, free_ports
from services.common.discovery import SERVER_OPTIONS, Mesh
from services.common.peers import GATEWAY, INFERENCE, POLICY, TOKENIZER, direct_stub, open_mesh, public_gateway

WAYS = ("direct", "relay", "relay+render", "relay+render+reserve", "relay+render+overlap", "relay+overlap",
        "gateway", "gateway, no overlap", "gateway, tokenizer renders")
CALLS = {"relay": (), "relay+render": ("render",), "relay+render+reserve": ("render", "reserve"),
         "relay+render+overlap": ("render", "overlap"), "relay+overlap": ("overlap",)}
# The other gateways on the same mesh, each with one setting off.
OTHER_GATEWAYS = {"gateway, no overlap": ("--overlap-admission", "off"),
                  "gateway, tokenizer renders": ("--local-render", "off")}
KEY_ENV = "LMESH_BENCH_KEY"  # the relay's API key for Reserve (not in its command line)
TARGET_MS = 5.0  # issue 17: time to first token added by the whole mesh, p50


class NullRelay(inference_pb2_grpc.InferenceServicer):
    """Forwards each Generate to a replica and relays its answers, after `calls` ("render", "reserve")."""

    def __init__(self, mesh: Mesh, model_id: str, calls: tuple[str, ...], key: str) -> None:
        self._mesh, self._model_id, self._calls, self._key = mesh, model_id, calls, key
        self._render = tokenizer_pb2.ApplyChatTemplateRequest(
            model=model_id, add_generation_prompt=True, max_prompt_tokens=PROMPT_BOUND,
            messages=[tokenizer_pb2.ChatMessage(role="user", content=QUESTIONS[0])])
        self._settles: set[asyncio.Task[Any]] = set()

    async def Generate(self, request_iterator: AsyncIterator[inference_pb2.GenerateRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateResponse]:
        start = await anext(aiter(request_iterator))
        reservation_id = ""
        prompt_tokens = len(start.start.prompt_token_ids)
        admission: asyncio.Future[Any] | None = None
        for name in self._calls:
            if name == "render":
                prompt_tokens = len((await self._mesh.peer(TOKENIZER).call(lambda t: t.ApplyChatTemplate,
                                                                           self._render)).token_ids)
            else:
                reservation_id = f"relay-{uuid.uuid4().hex}"
                reserve = policy_pb2.ReserveRequest(
                    api_key=self._key, model="default", resolved_model=self._model_id, prompt_tokens=prompt_tokens,
                    max_tokens=start.start.max_tokens, reservation_id=reservation_id)
                admission = asyncio.ensure_future(self._mesh.peer(POLICY).call(lambda p: p.Reserve, reserve))
                if name == "reserve":
                    await admission
        try:
            async with self._mesh.peer(INFERENCE).lease() as lease:
                call = lease.stub.Generate(**lease.options(timeout=600))
                await call.write(start)
                await call.done_writing()
                async for response in call:
                    if admission is not None:
                        await admission
                    yield response
        finally:
            if reservation_id:
                settle = asyncio.create_task(self._mesh.peer(POLICY).call(lambda p: p.Settle, policy_pb2.SettleRequest(
                    reservation_id=reservation_id, ending=policy_pb2.ENDING_FINISHED)))
                self._settles.add(settle)
                settle.add_done_callback(self._settles.discard)


async def serve(consul_addr: str, port: int, model_id: str, calls: tuple[str, ...]) -> None:
    mesh = await open_mesh(consul_addr, identity="lmesh-gateway")
    try:
        for service in (TOKENIZER, INFERENCE, POLICY):
            await mesh.peer(service).wait_for(timeout=120)
        server = grpc.aio.server(options=SERVER_OPTIONS)  # the mesh's keepalive pings allowed, as by its services
        relay = NullRelay(mesh, model_id, calls, os.environ.get(KEY_ENV, ""))
        inference_pb2_grpc.add_InferenceServicer_to_server(relay, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("serving", flush=True)
        await server.wait_for_termination()
    finally:
        await mesh.close()


async def generate_through(stub: inference_pb2_grpc.InferenceStub, prompts: list[list[int]], model_id: str,
                           max_tokens: int, index: int) -> Stream:
    start = inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
        model=model_id, prompt_token_ids=prompts[index], max_tokens=max_tokens,
        sampling=inference_pb2.SamplingParams(temperature=0.0), request_id=f"relay-{index}"))
    began = time.perf_counter()
    call = stub.Generate(timeout=600)
    await call.write(start)
    await call.done_writing()
    tokens, first = 0, 0.0
    async for message in call:
        if message.WhichOneof("kind") == "tokens":
            first = first or time.perf_counter()
            tokens += len(message.tokens.tokens)
    return Stream(tokens, first - began, time.perf_counter() - began)


@contextlib.asynccontextmanager
async def relay_process(mesh: RunningMesh, name: str) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    """The null relay making the calls of way `name`, as a process of its own; a stub on its port."""
    port = free_port()
    process = mesh.supervisor.spawn(
        name, [sys.executable, "-m", "bench.relay_floor", "--serve", "--consul", mesh.consul_addr, "--port",
               str(port), "--model-id", mesh.model_id, "--calls", ",".join(CALLS[name])],
        label=f"null relay ({name})", env={**os.environ, KEY_ENV: mesh.key})
    deadline = time.monotonic() + 120
    while True:  # listening once it accepts a connection
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            break
        except OSError:
            if time.monotonic() > deadline or process.process.poll() is not None:
                raise RuntimeError(f"the null relay {name} did not start") from None
            await asyncio.sleep(0.2)
    async with direct_stub(INFERENCE, f"127.0.0.1:{port}") as stub:
        yield stub


@contextlib.asynccontextmanager
async def second_gateway(mesh: RunningMesh, as_gateway: Mesh, way: str, *args: str) -> AsyncIterator[Any]:
    """Another gateway process on the mesh, started with `args`; a stub on its gRPC port once Consul lists it."""
    port, http_port = free_ports(2)
    mesh.supervisor.start("gateway", "--port", str(port), "--http-port", str(http_port), "--grace", "2", *args,
                          name=f"gateway-{list(OTHER_GATEWAYS).index(way) + 2}")
    deadline = time.monotonic() + 120
    while not any(e.port == port for e in await as_gateway.resolver(GATEWAY.name).passing()):
        if time.monotonic() > deadline:
            raise RuntimeError("the second gateway did not pass its health check")
        await asyncio.sleep(0.25)
    async with public_gateway(f"127.0.0.1:{port}") as stub:
        yield stub


async def chat_through(ways: Ways, stub: Any, max_tokens: int, index: int) -> Stream:
    """`Ways.grpc` (a gRPC Chat) on another gateway's stub."""
    mine, ways.gateway = ways.gateway, stub
    try:
        return await ways.grpc(index, max_tokens)
    finally:
        ways.gateway = mine


@dataclass
class Timings:
    """Per way, chat by chat (interleaved, so index i of every way ran side by side): the time to the first token,
    and the time per token after it (the decode's, ms; None for a chat of one token, which has no decode)."""

    ttft_ms: dict[str, list[float]] = field(default_factory=lambda: {way: [] for way in WAYS})
    per_token_ms: dict[str, list[float | None]] = field(default_factory=lambda: {way: [] for way in WAYS})

    def add(self, way: str, stream: Stream) -> None:
        self.ttft_ms[way].append(stream.ttft_s * 1e3)
        decode = stream.tokens > 1
        self.per_token_ms[way].append((stream.wall_s - stream.ttft_s) * 1e3 / (stream.tokens - 1) if decode else None)


async def measure(model_dir: Path, chats: int, max_tokens: int) -> Timings:
    timings = Timings()
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-relay-") as scratch:
        work = Path(scratch)
        policy_args = ("--rules", str(input_only_rules(work / "rules.yaml")))
        async with full_mesh(model_dir, work, policy_args=policy_args) as mesh:
            as_gateway = await open_mesh(mesh.consul_addr, identity="lmesh-gateway")
            try:
                prompts = await rendered_prompts(as_gateway, mesh.model_id)
                async with contextlib.AsyncExitStack() as relays, Ways(mesh, as_gateway, prompts, None) as ways:
                    one: dict[str, Callable[[int], Awaitable[Stream]]] = {
                        "direct": lambda i: ways.direct(i, max_tokens), "gateway": lambda i: ways.grpc(i, max_tokens)}
                    for name in CALLS:
                        stub = await relays.enter_async_context(relay_process(mesh, name))
                        one[name] = functools.partial(generate_through, stub, prompts, mesh.model_id, max_tokens)
                    for way, settings in OTHER_GATEWAYS.items():
                        other = await relays.enter_async_context(second_gateway(mesh, as_gateway, way, *settings))
                        one[way] = functools.partial(chat_through, ways, other, max_tokens)
                    for way in WAYS:  # warm: connections, and every prompt in the prefix cache
                        for index in range(len(QUESTIONS)):
                            await one[way](index)
                    for n in range(chats):
                        for way in WAYS if n % 2 == 0 else WAYS[::-1]:
                            timings.add(way, await one[way](n % len(QUESTIONS)))
            finally:
                await as_gateway.close()
    return timings


def summarize(timings: Timings) -> dict[str, Any]:
    ttft, per_token = timings.ttft_ms, timings.per_token_ms
    rows = {}
    for way in WAYS:
        added = [t - d for t, d in zip(ttft[way], ttft["direct"], strict=True)]
        rows[way] = {"ttft_p50_ms": statistics.median(ttft[way]), "ttft_p90_ms": percentile(ttft[way], 90),
                     "added_p50_ms": statistics.median(added), "added_mean_ms": statistics.fmean(added)}
        pairs = [(t, d) for t, d in zip(per_token[way], per_token["direct"], strict=True)
                 if t is not None and d is not None]
        if pairs:
            token_added = [t - d for t, d in pairs]
            rows[way] |= {"per_token_p50_ms": statistics.median(t for t, _ in pairs),
                          "per_token_added_p50_ms": statistics.median(token_added),
                          "per_token_added_mean_ms": statistics.fmean(token_added)}
    return rows


def render(rows: dict[str, Any], chats: int) -> str:
    lines = [f"| way ({chats} single chats each, interleaved) | TTFT p50 / p90 ms | added to direct, paired: "
             "p50 / mean ms |", "| --- | --: | --: |"]
    for way, row in rows.items():
        lines.append(f"| {way} | {row['ttft_p50_ms']:.1f} / {row['ttft_p90_ms']:.1f} | "
                     f"{row['added_p50_ms']:.2f} / {row['added_mean_ms']:.2f} |")
    lines.append("")
    if all("per_token_p50_ms" in row for row in rows.values()):
        lines += ["| way | time per token after the first, p50 ms | added to direct, paired: p50 / mean ms |",
                  "| --- | --: | --: |"]
        lines += [f"| {way} | {row['per_token_p50_ms']:.2f} | {row['per_token_added_p50_ms']:.3f} / "
                  f"{row['per_token_added_mean_ms']:.3f} |" for way, row in rows.items()]
        lines.append("")
    lines.append(f"A front door that only relays and renders adds {rows['relay+render']['added_p50_ms']:.2f} ms p50; "
                 f"one that also admits, {rows['relay+render+reserve']['added_p50_ms']:.2f} ms (overlapped: "
                 f"{rows['relay+render+overlap']['added_p50_ms']:.2f} ms); the target for the whole mesh is "
                 f"<= {TARGET_MS:g} ms. Without the call to render (overlapped admission only): "
                 f"{rows['relay+overlap']['added_p50_ms']:.2f} ms. The gateway adds "
                 f"{rows['gateway']['added_p50_ms']:.2f} ms ({rows['gateway, no overlap']['added_p50_ms']:.2f} ms "
                 f"without overlapped admission, {rows['gateway, tokenizer renders']['added_p50_ms']:.2f} ms with "
                 "every prompt rendered by lmesh-tokenizer).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--chats", type=int, default=60, help="single chats per way (default 60)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/relay_floor.json"))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the relay process itself
    parser.add_argument("--consul", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-id", help=argparse.SUPPRESS)
    parser.add_argument("--calls", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.consul, args.port, args.model_id, tuple(c for c in args.calls.split(",") if c)))
        return 0
    began = time.monotonic()
    timings = asyncio.run(measure(args.model_dir, args.chats, args.max_tokens))
    rows = summarize(timings)
    print(render(rows, args.chats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "chats": args.chats,
                                    "max_tokens": args.max_tokens, "summary": rows, "ttft_ms": timings.ttft_ms,
                                    "per_token_ms": timings.per_token_ms,
                                    "seconds": time.monotonic() - began}, indent=2) + "\n")
    print(f"(JSON: {args.out}; {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

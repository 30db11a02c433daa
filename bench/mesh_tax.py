"""What the mesh costs, side by side in one run: the same greedy streams sent straight to the inference service
(Generate, over the mesh's mTLS, as the gateway sends them), through the gateway's gRPC `Chat`, through its
OpenAI HTTP endpoint, and through LiteLLM's proxy in front of that endpoint; and `bench.ceiling`'s bound for the
engine's graph, measured in this process between rounds.

One mesh (registry, policy, tokenizer, inference, gateway as separate processes), its guardrails on the input only
unless `--output-guardrails`: redacting the output holds each word back until it is complete (a decode step or
more before the first text), a cost of that feature, not of the mesh. Every way gets the same
prompts (bench.prompts: greedy answers that run past max_tokens, so every stream has the same length):
  * 16 streams at once: tokens/s, and each process's CPU seconds per 1000 tokens (from /proc), which shows who
    takes the cores from the engine;
  * one stream at a time: time to first token (p50/p99) and tokens/s.
Rounds alternate the order of the ways; medians over rounds, with their spread.

  python -m bench.mesh_tax --model-dir DIR [--rounds 3] [--streams 16] [--max-tokens 64] [--single 8]
                           [--single-tokens 32] [--litellm PATH | --no-litellm] [--output-guardrails] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx2
import yaml
from lmesh.gateway.v1 import gateway_pb2
from lmesh.inference.v1 import inference_pb2
from lmesh.policy.v1 import policy_pb2
from lmesh.tokenizer.v1 import tokenizer_pb2

from bench.engine_step import bare_loop_step_ms
from bench.full_mesh import RunningMesh, cpu_seconds, full_mesh
from bench.litellm_proxy import Proxy, litellm_executable, litellm_proxy
from bench.prompts import QUESTIONS
from bench.stats import machine, percentile
from services.common.config import lmesh_cache
from services.common.discovery import Mesh
from services.common.peers import INFERENCE, POLICY, TOKENIZER, open_mesh, public_gateway
from services.policy.rules import DEFAULT_RULES_PATH

DIRECT, GRPC, HTTP, LITELLM = "direct", "grpc", "http", "litellm"
NAMES = {DIRECT: "inference Generate, direct", GRPC: "gateway gRPC Chat", HTTP: "gateway HTTP (OpenAI SSE)",
         LITELLM: "LiteLLM proxy -> gateway HTTP"}
PROCESSES = ("inference", "gateway", "tokenizer", "policy", "litellm")
MESH_PROCESSES = ("gateway", "tokenizer", "policy", "litellm")  # what a request passes besides the engine
THROUGHPUT_TARGET = 0.9
TTFT_ADDED_TARGET_MS = 5.0
CEILING_GOAL = 0.85
LITELLM_SHARE_TARGET = 1 / 3
RETRIES = 3
PROMPT_BOUND = 4096  # the questions are a few dozen tokens: no bound the gateway sets is reached


@dataclass
class Stream:
    tokens: int
    ttft_s: float
    wall_s: float


@dataclass
class Results:
    batches: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # way -> per round
    singles: dict[str, list[Stream]] = field(default_factory=dict)
    ceiling_step_ms: list[float] = field(default_factory=list)
    ceiling_cpu_s_per_1000_tokens: list[float] = field(default_factory=list)  # the bare loop's, in this process
    retries: dict[str, int] = field(default_factory=dict)  # streams retried after UNAVAILABLE, by way
    # The calls a chat's first token waits for, each timed alone with the gateway's identity: ms, by call.
    dependent_calls_ms: dict[str, list[float]] = field(default_factory=dict)


class Ways:
    """The clients: one per way, all warm, all on this process's event loop."""

    def __init__(self, mesh: RunningMesh, as_gateway: Mesh, prompts: list[list[int]], litellm: Proxy | None) -> None:
        self.mesh, self.as_gateway, self.prompts = mesh, as_gateway, prompts
        self.http = httpx2.AsyncClient(timeout=600, limits=httpx2.Limits(max_connections=64,
                                                                         max_keepalive_connections=64))
        # The OpenAI endpoints: base URL and bearer key.
        self.openai = {HTTP: (mesh.http_base, mesh.key), **({LITELLM: (litellm.base, litellm.key)} if litellm else {})}
        self.gateway_stub_context = public_gateway(mesh.grpc_target)
        self.retries: dict[str, int] = {}

    async def __aenter__(self) -> Ways:
        self.gateway = await self.gateway_stub_context.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.gateway_stub_context.__aexit__(None, None, None)
        await self.http.aclose()

    @property
    def names(self) -> list[str]:
        return [DIRECT, GRPC, HTTP, *([LITELLM] if LITELLM in self.openai else [])]

    def of(self, way: str) -> Callable[[int, int], Awaitable[Stream]]:
        one: Callable[[int, int], Awaitable[Stream]]
        if way == DIRECT:
            one = self.direct
        elif way == GRPC:
            one = self.grpc
        else:
            one = functools.partial(self.openai_http, *self.openai[way])
        return lambda index, max_tokens: self.retried(way, one, index, max_tokens)

    async def retried(self, way: str, one: Callable[[int, int], Awaitable[Stream]], index: int, max_tokens: int,
                      ) -> Stream:
        """As a client does with UNAVAILABLE: on a loaded machine Consul may miss a health check of a busy
        replica for a moment. Counted in `self.retries`; the retried stream's times start over."""
        for attempt in range(RETRIES):
            try:
                return await one(index, max_tokens)
            except (grpc.aio.AioRpcError, httpx2.HTTPStatusError) as exc:
                unavailable = (exc.code() == grpc.StatusCode.UNAVAILABLE if isinstance(exc, grpc.aio.AioRpcError)
                               else exc.response.status_code == 503)
                if not unavailable or attempt == RETRIES - 1:
                    raise
                self.retries[way] = self.retries.get(way, 0) + 1
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    async def direct(self, index: int, max_tokens: int) -> Stream:
        """Generate on the replica, with the prompt the gateway renders for the same question."""
        start = inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
            model=self.mesh.model_id, prompt_token_ids=self.prompts[index], max_tokens=max_tokens,
            sampling=inference_pb2.SamplingParams(temperature=0.0), request_id=f"bench-{index}"))
        tokens, first = 0, 0.0
        async with self.as_gateway.peer(INFERENCE).lease() as lease:
            began = time.perf_counter()
            call = lease.stub.Generate(**lease.options(timeout=600))
            await call.write(start)
            await call.done_writing()
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("kind") == "tokens":
                    first = first or time.perf_counter()
                    tokens += len(message.tokens.tokens)
        return Stream(tokens, first - began, time.perf_counter() - began)

    async def dependent_calls(self, index: int, max_tokens: int) -> dict[str, float]:
        """ms of each call the gateway makes, one after the other, before inference may start a chat: the prompt
        rendered (ApplyChatTemplate), then admitted and reserved (Reserve, which needs the exact prompt); the
        reservation is settled at once."""
        render = tokenizer_pb2.ApplyChatTemplateRequest(
            model=self.mesh.model_id, add_generation_prompt=True, max_prompt_tokens=PROMPT_BOUND,
            messages=[tokenizer_pb2.ChatMessage(role="user", content=QUESTIONS[index])])
        began = time.perf_counter()
        rendered = await self.as_gateway.peer(TOKENIZER).call(lambda t: t.ApplyChatTemplate, render)
        rendered_at = time.perf_counter()
        reservation_id = f"bench-floor-{os.getpid()}-{time.monotonic_ns()}"
        await self.as_gateway.peer(POLICY).call(lambda p: p.Reserve, policy_pb2.ReserveRequest(
            api_key=self.mesh.key, model="default", resolved_model=self.mesh.model_id,
            prompt_tokens=len(rendered.token_ids), max_tokens=max_tokens, reservation_id=reservation_id))
        reserved_at = time.perf_counter()
        await self.as_gateway.peer(POLICY).call(lambda p: p.Settle, policy_pb2.SettleRequest(
            reservation_id=reservation_id, ending=policy_pb2.ENDING_CANCELLED))
        return {"ApplyChatTemplate": (rendered_at - began) * 1e3, "Reserve": (reserved_at - rendered_at) * 1e3}

    async def grpc(self, index: int, max_tokens: int) -> Stream:
        began = time.perf_counter()
        call = self.gateway.Chat(metadata=(("authorization", f"Bearer {self.mesh.key}"),), timeout=600)
        await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
            max_tokens=max_tokens, messages=[gateway_pb2.Message(role="user", content=QUESTIONS[index])])))
        await call.done_writing()
        tokens, first = 0, 0.0
        async for response in call:
            if response.delta:
                first = first or time.perf_counter()
            if response.HasField("usage"):
                tokens = response.usage.completion_tokens
        return Stream(tokens, first - began, time.perf_counter() - began)

    async def openai_http(self, base: str, key: str, index: int, max_tokens: int) -> Stream:
        """POST /v1/chat/completions streamed; lines are parsed only until the first text and for the usage."""
        body = {"model": "default", "messages": [{"role": "user", "content": QUESTIONS[index]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        first, last = 0.0, ""
        began = time.perf_counter()
        async with self.http.stream("POST", f"{base}/v1/chat/completions", json=body,
                                    headers={"authorization": f"Bearer {key}"}) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                last = line
                if not first and any(c.get("delta", {}).get("content") for c in json.loads(line[6:])["choices"]):
                    first = time.perf_counter()
        usage = json.loads(last[6:]).get("usage") or {}
        if "completion_tokens" not in usage:
            raise RuntimeError(f"{base}: the stream's last chunk carried no usage: {last[:200]}")
        return Stream(int(usage["completion_tokens"]), first - began, time.perf_counter() - began)


async def rendered_prompts(as_gateway: Mesh, model_id: str) -> list[list[int]]:
    """Each question rendered by the tokenizer exactly as the gateway renders a one-message chat."""
    for service in (TOKENIZER, INFERENCE):  # a mesh client just opened has not heard from Consul yet
        await as_gateway.peer(service).wait_for(timeout=60)
    prompts = []
    for question in QUESTIONS:
        request = tokenizer_pb2.ApplyChatTemplateRequest(
            model=model_id, add_generation_prompt=True, max_prompt_tokens=PROMPT_BOUND,
            messages=[tokenizer_pb2.ChatMessage(role="user", content=question)])
        response = await as_gateway.peer(TOKENIZER).call(lambda t: t.ApplyChatTemplate, request)
        prompts.append(list(response.token_ids))
    return prompts


def process_cpu(mesh: RunningMesh) -> dict[str, float]:
    pids = {name: mesh.pid(name) for name in PROCESSES if name in mesh.supervisor.processes}
    return {**{name: cpu_seconds(pid) for name, pid in pids.items()}, "bench client": cpu_seconds(os.getpid())}


async def batch(ways: Ways, way: str, streams: int, max_tokens: int, offset: int) -> dict[str, Any]:
    before, began = process_cpu(ways.mesh), time.perf_counter()
    done = await asyncio.gather(*(ways.of(way)((offset + j) % len(QUESTIONS), max_tokens) for j in range(streams)))
    wall = time.perf_counter() - began
    after = process_cpu(ways.mesh)
    tokens = sum(s.tokens for s in done)
    if tokens != streams * max_tokens:
        raise RuntimeError(f"{way}: {tokens} tokens, not {streams} x {max_tokens}: the streams were not equal")
    return {"tokens_per_s": tokens / wall, "wall_s": wall,
            "cpu_s_per_1000_tokens": {name: (after[name] - before[name]) / tokens * 1000 for name in after}}


def input_only_rules(path: Path) -> Path:
    """The default guardrail rules, each screening the input only (rules only for the output left out)."""
    default = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    kept = [{**rule, "applies_to": ["input"]} for rule in default["rules"]
            if "input" in rule.get("applies_to", ["input"])]
    path.write_text(yaml.safe_dump({"rules": kept}))
    return path


async def measure(model_dir: Path, rounds: int, streams: int, max_tokens: int, single: int, single_tokens: int,
                  litellm: str | None, output_guardrails: bool) -> Results:
    from services.inference.onnx_model import OnnxDecoder

    results = Results()
    decoder = OnnxDecoder(model_dir / "model.onnx")
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-tax-") as scratch:
        work = Path(scratch)
        policy_args = () if output_guardrails else ("--rules", str(input_only_rules(work / "rules.yaml")))
        async with full_mesh(model_dir, work, policy_args=policy_args) as mesh:
            as_gateway = await open_mesh(mesh.consul_addr, identity="lmesh-gateway")
            try:
                prompts = await rendered_prompts(as_gateway, mesh.model_id)
                bare_loop_step_ms(decoder, prompts[:streams], 8)  # warm-up: first runs at each shape
                proxy = (litellm_proxy(litellm, f"{mesh.http_base}/v1", mesh.key, work / "litellm", mesh.supervisor)
                         if litellm else None)
                proxied = await proxy.__aenter__() if proxy else None
                try:
                    async with Ways(mesh, as_gateway, prompts, proxied) as ways:
                        try:
                            await run_rounds(ways, results, decoder, prompts, rounds, streams, max_tokens, single,
                                             single_tokens)
                        finally:
                            results.retries = ways.retries
                finally:
                    if proxy:
                        await proxy.__aexit__(None, None, None)
            finally:
                await as_gateway.close()
    return results


async def run_rounds(ways: Ways, results: Results, decoder: Any, prompts: list[list[int]], rounds: int,
                     streams: int, max_tokens: int, single: int, single_tokens: int) -> None:
    names = ways.names
    for way in names:  # warm: connections, caches, every prompt in the prefix cache for every way alike
        await asyncio.gather(*(ways.of(way)(j % len(QUESTIONS), 4) for j in range(max(streams, len(QUESTIONS)))))
        results.batches[way], results.singles[way] = [], []
    for round_ in range(rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for way in order:
            measured = await batch(ways, way, streams, max_tokens, round_ * streams)
            results.batches[way].append(measured)
            log(f"round {round_ + 1}, {way} x{streams}: {measured['tokens_per_s']:.1f} tok/s")
        for index in range(single):
            for way in order if index % 2 == 0 else order[::-1]:
                results.singles[way].append(await ways.of(way)((round_ * single + index) % len(QUESTIONS),
                                                                single_tokens))
            timed = await ways.dependent_calls((round_ * single + index) % len(QUESTIONS), single_tokens)
            for call, ms in timed.items():
                results.dependent_calls_ms.setdefault(call, []).append(ms)
        cpu = time.process_time()
        step = await asyncio.to_thread(bare_loop_step_ms, decoder, prompts[:streams], max_tokens)
        results.ceiling_step_ms.append(step)
        # Prompts included (a few runs), so this bounds the graph's own CPU per token from above.
        results.ceiling_cpu_s_per_1000_tokens.append((time.process_time() - cpu) / (streams * max_tokens) * 1000)
        log(f"round {round_ + 1}: single streams done; bare decode step {step:.1f} ms")


def log(message: str) -> None:
    print(f"[mesh_tax {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summarize(results: Results, streams: int, max_tokens: int) -> dict[str, Any]:
    """Medians over rounds (spread: min and max), the targets' checks."""
    ceiling = streams * max_tokens / ((max_tokens - 1) * min(results.ceiling_step_ms) / 1e3)
    ways: dict[str, Any] = {}
    for way, rounds in results.batches.items():
        rates = [r["tokens_per_s"] for r in rounds]
        singles = results.singles[way]
        cpu_names = rounds[0]["cpu_s_per_1000_tokens"].keys()
        ways[way] = {
            "name": NAMES[way],
            f"tokens_per_s_{streams}": statistics.median(rates), f"tokens_per_s_{streams}_rounds": rates,
            "cpu_s_per_1000_tokens": {n: statistics.median(r["cpu_s_per_1000_tokens"][n] for r in rounds)
                                      for n in cpu_names},
            "ttft_ms_p50": percentile([s.ttft_s for s in singles], 50) * 1e3,
            "ttft_ms_p99": percentile([s.ttft_s for s in singles], 99) * 1e3,
            "tokens_per_s_1": statistics.median(s.tokens / s.wall_s for s in singles),
            "single_streams": len(singles),
        }
    direct, gateway_grpc, gateway_http = ways[DIRECT], ways[GRPC], ways[HTTP]
    engine_cpu = direct["cpu_s_per_1000_tokens"].get("inference", 0.0)
    for way in ways.values():
        # CPU the mesh's own processes spend per token beyond what they spend while streams go direct (health
        # checks, watches); with every core busy it is taken from the engine, so the engine's CPU per token
        # over the sum is the tokens/s ratio that way allows whatever the machine's other load.
        cpu = way["cpu_s_per_1000_tokens"]
        way["mesh_cpu_s_per_1000_tokens"] = sum(cpu.get(p, 0.0) - direct["cpu_s_per_1000_tokens"].get(p, 0.0)
                                                for p in MESH_PROCESSES)
        way["cpu_bound_vs_direct"] = (engine_cpu / (engine_cpu + way["mesh_cpu_s_per_1000_tokens"])
                                      if engine_cpu > 0 else None)
    key = f"tokens_per_s_{streams}"
    checks = [
        check(f"gateway gRPC / direct, {streams} streams (tok/s)", gateway_grpc[key] / direct[key],
              f"≥ {THROUGHPUT_TARGET}", gateway_grpc[key] / direct[key] >= THROUGHPUT_TARGET),
        check(f"gateway HTTP / direct, {streams} streams (tok/s)", gateway_http[key] / direct[key],
              f"≥ {THROUGHPUT_TARGET}", gateway_http[key] / direct[key] >= THROUGHPUT_TARGET),
    ]
    for way in (GRPC, HTTP):
        bound = ways[way]["cpu_bound_vs_direct"]
        checks.append(check(f"gateway {way} / direct, {streams} streams, from CPU per token (with every core busy)",
                            bound, f"≥ {THROUGHPUT_TARGET}", None if bound is None else bound >= THROUGHPUT_TARGET))
    for way in (GRPC, HTTP):
        added = ways[way]["ttft_ms_p50"] - direct["ttft_ms_p50"]
        checks.append(check(f"TTFT added by the whole mesh, {way}, one stream, p50 (ms)", added,
                            f"≤ {TTFT_ADDED_TARGET_MS:.0f}", added <= TTFT_ADDED_TARGET_MS))
    floor = sum(statistics.median(ms) for ms in results.dependent_calls_ms.values()) if results.dependent_calls_ms \
        else None
    calls = " + ".join(results.dependent_calls_ms)
    checks.append(check(f"the calls a front door could make before the first token ({calls}), each timed alone, p50 "
                        "sum (ms; the gateway renders short prompts itself and overlaps Reserve with the prefill; "
                        "bench.relay_floor measures the floor)", floor, "", None))
    checks.append(check(f"gateway gRPC {streams} streams / bench.ceiling (tok/s)", gateway_grpc[key] / ceiling,
                        f"≥ {CEILING_GOAL} (goal)", gateway_grpc[key] / ceiling >= CEILING_GOAL))
    checks.append(check(f"direct {streams} streams / bench.ceiling (tok/s)", direct[key] / ceiling, "", None))
    if LITELLM in ways:
        proxied = ways[LITELLM]
        for what, mesh_added, proxy_added in (
            ("TTFT p50 (ms)", gateway_http["ttft_ms_p50"] - direct["ttft_ms_p50"],
             proxied["ttft_ms_p50"] - gateway_http["ttft_ms_p50"]),
            ("TTFT p99 (ms)", gateway_http["ttft_ms_p99"] - direct["ttft_ms_p99"],
             proxied["ttft_ms_p99"] - gateway_http["ttft_ms_p99"]),
            (f"time per token at {streams} streams (ms per 1000 tokens)",
             1e6 / gateway_http[key] - 1e6 / direct[key], 1e6 / proxied[key] - 1e6 / gateway_http[key]),
            ("time per token at 1 stream (ms per 1000 tokens)",
             1e6 / gateway_http["tokens_per_s_1"] - 1e6 / direct["tokens_per_s_1"],
             1e6 / proxied["tokens_per_s_1"] - 1e6 / gateway_http["tokens_per_s_1"]),
            (f"CPU s per 1000 tokens at {streams} streams (its processes beyond direct)",
             gateway_http["mesh_cpu_s_per_1000_tokens"],
             proxied["mesh_cpu_s_per_1000_tokens"] - gateway_http["mesh_cpu_s_per_1000_tokens"]),
        ):
            passed = mesh_added <= LITELLM_SHARE_TARGET * max(proxy_added, 0.0)
            checks.append(check(f"lmesh's mesh adds / LiteLLM adds: {what}: {mesh_added:.1f} vs {proxy_added:.1f}",
                                mesh_added / proxy_added if proxy_added > 0 else None, "≤ 0.33", passed))
    return {"ceiling_tokens_per_s": ceiling, "dependent_calls_ms": results.dependent_calls_ms,
            "ceiling_step_ms": results.ceiling_step_ms,
            "ceiling_cpu_s_per_1000_tokens": statistics.median(results.ceiling_cpu_s_per_1000_tokens or [0.0]),
            "ways": ways, "checks": checks, "retries_after_unavailable": results.retries}


def results_from_json(raw: dict[str, Any]) -> Results:
    return Results(batches=raw["batches"], singles={way: [Stream(**s) for s in streams]
                                                    for way, streams in raw["singles"].items()},
                   ceiling_step_ms=raw["ceiling_step_ms"],
                   ceiling_cpu_s_per_1000_tokens=raw["ceiling_cpu_s_per_1000_tokens"], retries=raw["retries"],
                   dependent_calls_ms=raw.get("dependent_calls_ms", {}))


def check(name: str, value: float | None, target: str, passed: bool | None) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "passed": passed}


def render(summary: dict[str, Any], streams: int, max_tokens: int, single_tokens: int) -> str:
    key = f"tokens_per_s_{streams}"
    direct = summary["ways"][DIRECT]
    processes = [p for p in (*PROCESSES, "bench client") if p in direct["cpu_s_per_1000_tokens"]
                 or any(p in w["cpu_s_per_1000_tokens"] for w in summary["ways"].values())]
    lines = [f"| way | {streams} x {max_tokens} tok/s (median; rounds) | vs direct | vs ceiling | "
             f"1 stream TTFT p50 / p99 ms | 1 stream x {single_tokens} tok/s | CPU s per 1000 tokens at {streams}: "
             + ", ".join(processes) + " | mesh CPU s per 1000 tokens, beyond direct | allows vs direct |",
             "| --- | --: | --: | --: | --: | --: | --- | --: | --: |"]
    for way in summary["ways"].values():
        cpu = way["cpu_s_per_1000_tokens"]
        lines.append(
            f"| {way['name']} | {way[key]:.1f} ({', '.join(f'{r:.0f}' for r in way[key + '_rounds'])}) | "
            f"{way[key] / direct[key]:.3f}x | {way[key] / summary['ceiling_tokens_per_s']:.3f} | "
            f"{way['ttft_ms_p50']:.1f} / {way['ttft_ms_p99']:.1f} | {way['tokens_per_s_1']:.1f} | "
            + ", ".join(f"{cpu[p]:.2f}" if p in cpu else "-" for p in processes)
            + f" | {way['mesh_cpu_s_per_1000_tokens']:.2f} | "
            + ("-" if way["cpu_bound_vs_direct"] is None else f"{way['cpu_bound_vs_direct']:.3f}x") + " |")
    lines += ["", f"bench.ceiling ({streams} x {max_tokens} tokens in {max_tokens - 1} bare decode steps of "
                  f"{min(summary['ceiling_step_ms']):.1f} ms, prompts free): {summary['ceiling_tokens_per_s']:.0f} "
                  f"tok/s; its loop's CPU s per 1000 tokens: {summary['ceiling_cpu_s_per_1000_tokens']:.2f}, "
                  "the inference process's at 16 direct streams: "
                  f"{direct['cpu_s_per_1000_tokens'].get('inference', 0.0):.2f}", "",
              "| check | value | target | |", "| --- | --: | --- | --- |"]
    for c in summary["checks"]:
        verdict = "" if c["passed"] is None else ("met" if c["passed"] else "MISSED")
        value = "-" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"| {c['name']} | {value} | {c['target']} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mesh_tax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single", type=int, default=8, help="one-stream chats per way per round (default 8)")
    parser.add_argument("--single-tokens", type=int, default=32)
    parser.add_argument("--litellm", help="the `litellm` command (default: next to this Python, else on PATH)")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--output-guardrails", action="store_true",
                        help="the default guardrail rules, output redaction included (default: input only)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/mesh_tax.json"))
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="measure nothing: summarize and print the raw results a run saved in FILE")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        header = saved["header"]
        summary = summarize(results_from_json(saved["raw"]), header["streams"], header["max_tokens"])
        print(render(summary, header["streams"], header["max_tokens"], header["single_tokens"]))
        return 0
    if args.streams > len(QUESTIONS):
        parser.error(f"--streams: at most {len(QUESTIONS)} (one prompt each)")
    litellm = None if args.no_litellm else litellm_executable(args.litellm)
    if litellm is None and not args.no_litellm:
        log("LiteLLM's proxy is not installed (`pip install 'litellm[proxy]'`, the bench extra): its row is left out")
    load_before = os.getloadavg()
    began = time.monotonic()
    results = asyncio.run(measure(args.model_dir.resolve(), args.rounds, args.streams, args.max_tokens, args.single,
                                  args.single_tokens, litellm, args.output_guardrails))
    summary = summarize(results, args.streams, args.max_tokens)
    summary["header"] = {
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "bench.mesh_tax", *(argv or sys.argv[1:])]),
        "machine": machine(), "rounds": args.rounds, "streams": args.streams, "max_tokens": args.max_tokens,
        "single_per_round": args.single, "single_tokens": args.single_tokens,
        "guardrails": "default rules" if args.output_guardrails else "default rules, input only",
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "duration_s": round(time.monotonic() - began, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    summary["raw"] = dataclasses.asdict(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(render(summary, args.streams, args.max_tokens, args.single_tokens))
    print(f"\n(JSON: {args.out}; {summary['header']['duration_s']} s; load before {summary['header']['load_before']},"
          f" after {summary['header']['load_after']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The response cache end to end: a real Consul agent, registry, policy, tokenizer and one inference replica as
processes, the real model, and two gateways with the cache on that share one real Redis.

A repeated greedy chat is answered from the cache over gRPC and HTTP with the same bytes, its usage marked, without
reaching inference (no Generate span carries its id); another tenant misses; `no_cache` and `Cache-Control` opt
out; an answer one gateway stored is a hit on the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, free_port
from services.common.discovery import Endpoint, Mesh
from services.common.peers import POLICY, REGISTRY, open_mesh
from services.policy.client import create_key
from services.registry.client import register_model_dir
from tests.harness import MeshProcesses
from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.redis_server import RedisServer
from tests.test_e2e import collect, read_rest

MODEL = "smollm2-135m-instruct:1"
GATEWAYS = ("gateway-a", "gateway-b")


@dataclass
class Gateway:
    port: int
    http_port: int


@dataclass
class CacheMesh:
    procs: MeshProcesses
    mesh: Mesh
    otlp: OtlpReceiver
    redis_url: str
    gateways: dict[str, Gateway]
    keys: dict[str, str]  # tenant -> API key

    async def stub(self, gateway: str = "gateway-a") -> gateway_pb2_grpc.GatewayStub:
        port = self.gateways[gateway].port
        endpoint = await self.mesh.resolver("lmesh-gateway").pick(on_port(port))
        return endpoint.stub(gateway_pb2_grpc.GatewayStub)

    async def chat(self, question: str, tenant: str = "acme", gateway: str = "gateway-a",
                   **fields: Any) -> list[gateway_pb2.ChatResponse]:
        start = gateway_pb2.ChatStart(messages=[gateway_pb2.Message(role="user", content=question)],
                                      max_tokens=fields.pop("max_tokens", 24), **fields)
        return await collect(await self.stub(gateway), gateway_pb2.ChatRequest(start=start), self.keys[tenant])

    async def post(self, body: dict[str, Any], tenant: str = "acme", gateway: str = "gateway-a",
                   headers: dict[str, str] | None = None) -> httpx2.Response:
        base = f"http://127.0.0.1:{self.gateways[gateway].http_port}"
        async with httpx2.AsyncClient(base_url=base, timeout=60) as client:
            return await client.post("/v1/chat/completions", json=body, headers={
                "authorization": f"Bearer {self.keys[tenant]}", **(headers or {})})


def on_port(port: int) -> Callable[[Endpoint], bool]:
    return lambda endpoint: endpoint.port == port


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def cached_mesh(consul_agent: ConsulAgent, built_model: Path, redis_server: RedisServer,
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CacheMesh]:
    otlp = OtlpReceiver()
    endpoint = await otlp.start()
    procs = MeshProcesses(consul_agent.http_addr, tmp_path_factory.mktemp("cache-mesh"), endpoint)
    await apply_intentions(consul_agent.http_addr)
    mesh = await open_mesh(consul_agent.http_addr, "lmesh-gateway", mtls=True)
    # Its own keys in the session's Redis, whatever other tests left there.
    prefix = f"lmesh-test-{free_port()}:"
    gateways = {name: Gateway(free_port(), free_port()) for name in GATEWAYS}
    try:
        for service in ("registry", "policy", "tokenizer", "inference"):
            procs.start(service)
        for name, gateway in gateways.items():
            procs.supervisor.start(
                "gateway", "--grace", "5", "--port", str(gateway.port), "--http-port", str(gateway.http_port),
                "--response-cache", "on", "--response-cache-redis-prefix", prefix,
                "--response-cache-redis-timeout-ms", "1000",  # a loaded test machine must not turn hits into misses
                name=name, env={**procs.env(), "LMESH_RESPONSE_CACHE_REDIS": redis_server.url})
        await procs.wait_passing(mesh, "registry")
        await register_model_dir(mesh.peer(REGISTRY), built_model, aliases=("default",))
        await procs.wait_passing(mesh, "policy")
        keys = {tenant: (await create_key(mesh.peer(POLICY), tenant)).api_key for tenant in ("acme", "globex")}
        for service in ("tokenizer", "inference"):
            await procs.wait_passing(mesh, service, model=MODEL if service == "inference" else "")
        for name, gateway in gateways.items():
            await procs.wait_passing(mesh, "gateway", name=name)
            await mesh.resolver("lmesh-gateway").wait_for(on_port(gateway.port), timeout=60)
        yield CacheMesh(procs, mesh, otlp, redis_server.url, gateways, keys)
    finally:
        await mesh.close()
        await procs.stop_all()
        await otlp.stop()


def replayable(responses: list[gateway_pb2.ChatResponse]) -> list[bytes]:
    """The responses' bytes without what belongs to one request (its id, and whether it was a hit)."""
    copies = []
    for response in responses:
        copy = gateway_pb2.ChatResponse()
        copy.CopyFrom(response)
        copy.id = ""
        copy.usage.cached_response = False
        copies.append(copy.SerializeToString(deterministic=True))
    return copies


def generations(spans: list[ReceivedSpan], completion_id: str) -> list[ReceivedSpan]:
    return [s for s in spans
            if s.service == "lmesh-inference" and s.attributes.get("lmesh.request_id") == completion_id]


def gateway_result(spans: list[ReceivedSpan], completion_id: str) -> object:
    return next((s.attributes["lmesh.response_cache"] for s in spans
                 if s.service == "lmesh-gateway" and s.attributes.get("gen_ai.response.id") == completion_id
                 and "lmesh.response_cache" in s.attributes), None)


async def assert_reached_inference(live: CacheMesh, ran: list[str], skipped: list[str]) -> None:
    """Every id in `ran` has inference's Generate span; none in `skipped` has one (checked once the later `ran`
    ones arrived: one replica exports its spans in the order they ended)."""
    spans = await live.otlp.wait_for(lambda spans: all(generations(spans, i) for i in ran), timeout=30)
    assert not [i for i in skipped if generations(spans, i)]


async def test_a_repeated_greedy_chat_is_replayed_over_grpc_and_http_without_the_model(cached_mesh: CacheMesh) -> None:
    live = cached_mesh
    question = "What is the capital of France?"
    first = await live.chat(question, logprobs=True, top_logprobs=2)
    again = await live.chat(question, logprobs=True, top_logprobs=2)
    assert not first[-1].usage.cached_response and again[-1].usage.cached_response
    assert replayable(again) == replayable(first)  # the same deltas, logprobs, finish and usage, chunk for chunk
    assert "Paris" in "".join(r.delta for r in again) and again[-1].id != first[-1].id
    # HTTP shares the cache (one request path): the same request in OpenAI's form is a hit, its bytes the same as
    # a second hit's but for the id and creation time.
    body = {"model": "default", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 24, "logprobs": True, "top_logprobs": 2}
    whole = [await live.post(body) for _ in range(2)]
    assert [r.headers["x-lmesh-cache"] for r in whole] == ["hit", "hit"]
    answers = [r.json() for r in whole]
    assert answers[0]["usage"]["lmesh"] == {"cached_response": True}
    assert answers[0]["choices"][0]["message"]["content"] == "".join(r.delta for r in first)
    blanked = [{**a, "id": "", "created": 0} for a in answers]
    assert blanked[0] == blanked[1]
    assert answers[0]["usage"]["completion_tokens"] == first[-1].usage.completion_tokens
    # No Generate on inference for the hits; the gateway's span says which was which.
    await assert_reached_inference(live, [first[-1].id], [again[-1].id, *(a["id"] for a in answers)])
    spans = await live.otlp.wait_for(lambda spans: gateway_result(spans, again[-1].id) is not None)
    assert (gateway_result(spans, first[-1].id), gateway_result(spans, again[-1].id)) == ("miss", "hit")
    await live.otlp.wait_for_metric("lmesh-gateway", "lmesh.gateway.response_cache.lookups", lambda v: v >= 4)


async def test_another_tenant_and_an_opted_out_request_run_the_model(cached_mesh: CacheMesh) -> None:
    live = cached_mesh
    question = "Name a primary color."
    stored = await live.chat(question)
    assert (await live.chat(question))[-1].usage.cached_response
    other = await live.chat(question, tenant="globex")
    opted_out = await live.chat(question, no_cache=True)
    assert not other[-1].usage.cached_response and not opted_out[-1].usage.cached_response
    body = {"model": "default", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 24}
    bypassed = await live.post(body, headers={"Cache-Control": "no-cache"})
    assert bypassed.headers["x-lmesh-cache"] == "bypass"
    assert bypassed.json()["usage"]["lmesh"] == {"cached_response": False}
    # Greedy: the same text either way.
    assert "".join(r.delta for r in other) == "".join(r.delta for r in stored) == bypassed.json()["choices"][0][
        "message"]["content"]
    await assert_reached_inference(live, [stored[-1].id, other[-1].id, opted_out[-1].id, bypassed.json()["id"]], [])


async def test_a_sampled_chat_is_cached_only_with_a_seed(cached_mesh: CacheMesh) -> None:
    live = cached_mesh
    question = "Say something about the sea."
    unseeded = [await live.chat(question, temperature=0.9) for _ in range(2)]
    assert not any(r[-1].usage.cached_response for r in unseeded)
    seeded = [await live.chat(question, temperature=0.9, seed=1234) for _ in range(2)]
    assert [r[-1].usage.cached_response for r in seeded] == [False, True]
    assert replayable(seeded[1]) == replayable(seeded[0])


async def test_two_gateways_on_one_redis_share_a_hit(cached_mesh: CacheMesh) -> None:
    live = cached_mesh
    question = "What is two plus two?"
    stored = await live.chat(question, gateway="gateway-a")
    assert not stored[-1].usage.cached_response
    redis = aioredis.Redis.from_url(live.redis_url)
    try:
        for _ in range(100):  # gateway A writes Redis in the background, right after the answer
            if [k async for k in redis.scan_iter(match="lmesh-test-*response-cache:*")]:
                break
            await asyncio.sleep(0.05)
        keys = [k async for k in redis.scan_iter(match="lmesh-test-*response-cache:*")]
        assert keys and all(b"two" not in k for k in keys)  # a hash, never the prompt
    finally:
        await redis.aclose()
    shared = await live.chat(question, gateway="gateway-b")
    assert shared[-1].usage.cached_response
    assert replayable(shared) == replayable(stored)
    await assert_reached_inference(live, [stored[-1].id], [shared[-1].id])


async def test_a_cancelled_chat_is_not_stored(cached_mesh: CacheMesh) -> None:
    live = cached_mesh
    story = "Tell me a long story about a lighthouse."
    start = gateway_pb2.ChatStart(messages=[gateway_pb2.Message(role="user", content=story)], max_tokens=64)
    call = (await live.stub()).Chat(metadata=(("authorization", f"Bearer {live.keys['acme']}"),), timeout=60)
    await call.write(gateway_pb2.ChatRequest(start=start))
    first = await call.read()
    await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
    await call.done_writing()
    responses = [first, *await read_rest(call)]
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    again = await live.chat(story, max_tokens=64)
    assert not again[-1].usage.cached_response
    assert again[-1].finish_reason != generation_pb2.FINISH_REASON_CANCELLED

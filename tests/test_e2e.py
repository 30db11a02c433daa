"""End to end: a real Consul agent, the five services as separate processes, the real model.

Covers the spine: discovery, a streamed answer, cancel, one trace across every service, failure and
recovery of inference, graceful drain, and bad input at the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from lmesh.policy.v1 import policy_pb2

from services.common.config import lmesh_cache
from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, consul_answers
from services.common.discovery import Endpoint, Mesh
from services.common.errors import AlreadyExists
from services.common.peers import POLICY, REGISTRY, GatewayTls, open_mesh, public_gateway, write_first
from services.policy.client import create_key, revoke_key
from services.registry.client import register_model_dir
from tests.harness import ROOT, MeshProcesses
from tests.otlp import OtlpReceiver
from tests.prometheus_server import PrometheusServer, consul_targets
from tests.test_metrics import Families, dashboard_queries, dashboard_selectors, scrape, value
from tests.tls_certs import Pki

SERVICES = ("registry", "policy", "tokenizer", "inference", "gateway")
FRANCE = "What is the capital of France?"
INT8 = "smollm2-135m-instruct:1-int8"
LONG_TASK = "Write a very long story about a dragon who learns to cook. Make it at least 500 words."


@dataclass
class LiveMesh:
    procs: MeshProcesses
    mesh: Mesh
    otlp: OtlpReceiver
    api_key: str

    async def gateway(self) -> gateway_pb2_grpc.GatewayStub:
        # A plaintext one (a test may run a TLS gateway beside it for a while).
        endpoint = await self.mesh.resolver("lmesh-gateway").pick(lambda e: e.meta.get("tls") != "true")
        return endpoint.stub(gateway_pb2_grpc.GatewayStub)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def live(consul_agent: ConsulAgent, built_model: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> AsyncIterator[LiveMesh]:
    otlp = OtlpReceiver()
    endpoint = await otlp.start()
    procs = MeshProcesses(consul_agent.http_addr, tmp_path_factory.mktemp("mesh"), endpoint)
    # The services run mTLS (the default) and intentions allow the request path only; the tests call internal
    # services directly as the gateway would, so they take its identity.
    await apply_intentions(consul_agent.http_addr)
    mesh = await open_mesh(consul_agent.http_addr, "lmesh-gateway", mtls=True)
    try:
        write_e2e_rules(procs.home)
        for service in SERVICES:
            start_core(procs, service)
        await procs.wait_passing(mesh, "registry")
        await register_model_dir(mesh.peer(REGISTRY), built_model, aliases=("default",))
        int8 = (built_model / "lmesh_model.int8.json").exists()
        if int8:
            await register_model_dir(mesh.peer(REGISTRY), built_model, aliases=(),
                                     manifest_name="lmesh_model.int8.json")
            # Tiny admission bounds, so a test can fill them with three requests.
            procs.start("inference", "--model", INT8, "--max-active", "1", "--max-queue", "1",
                        name="inference-int8")
        await procs.wait_passing(mesh, "policy")
        created = await create_key(mesh.peer(POLICY), "e2e")
        for service in SERVICES:
            await wait_core(procs, mesh, service)
        if int8:
            await procs.wait_passing(mesh, "inference", name="inference-int8", model=INT8)
        yield LiveMesh(procs, mesh, otlp, created.api_key)
    finally:
        await mesh.close()
        await procs.stop_all()
        await otlp.stop()


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def services_running_after_each_test(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test that stops a service starts it again before it ends; one that fails on the way would leave every later
    test without it: its failure stays its own."""
    yield
    if "live" not in request.fixturenames:
        return
    live: LiveMesh = request.getfixturevalue("live")
    for service in SERVICES:
        process = live.procs.processes.get(service)
        if process is None or process.exited():
            start_core(live.procs, service)
            await wait_core(live.procs, live.mesh, service)


def start_core(procs: MeshProcesses, service: str) -> None:
    """One of the five core services as the module's mesh runs it: policy with the rules file (the default rules,
    and rules scoped to tenants of the guardrail tests)."""
    procs.start(service, *(["--rules", str(e2e_rules_path(procs.home))] if service == "policy" else []))


async def wait_core(procs: MeshProcesses, mesh: Mesh, service: str) -> None:
    await procs.wait_passing(mesh, service, model="smollm2-135m-instruct:1" if service == "inference" else "")


E2E_RULES = """
  - id: e2e-no-paris
    detect: deny
    action: block
    phrases: [paris]
    applies_to: [output]
    tenants: [guarded]
  - id: e2e-france
    detect: deny
    action: redact
    phrases: [france]
    applies_to: [output]
    tenants: [redacted]
  - id: e2e-password
    detect: deny
    action: block
    phrases: ["open sesame"]
    applies_to: [input]
    tenants: [guarded]
"""


def e2e_rules_path(home: Path) -> Path:
    return home / "guardrails.yaml"


def write_e2e_rules(home: Path, extra: str = "") -> Path:
    """The default rules plus the e2e tenants' ones (and `extra`), renamed into place as an editor would."""
    from services.policy.rules import DEFAULT_RULES_PATH

    path = e2e_rules_path(home)
    fresh = path.with_suffix(".tmp")
    fresh.write_text(DEFAULT_RULES_PATH.read_text() + E2E_RULES + extra)
    os.replace(fresh, path)
    return path


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def start(question: str = FRANCE, **fields: object) -> gateway_pb2.ChatRequest:
    params: dict[str, object] = {"max_tokens": 48, **fields}
    if "messages" not in params:
        params["messages"] = [gateway_pb2.Message(role="user", content=question)]
    return gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(**params))  # type: ignore[arg-type]


async def collect(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.ChatRequest, key: str,
                  timeout: float = 60) -> list[gateway_pb2.ChatResponse]:
    call = stub.Chat(metadata=auth(key), timeout=timeout)
    await call.write(request)
    await call.done_writing()
    return [r async for r in call]


async def read_rest(call: grpc.aio.StreamStreamCall) -> list[gateway_pb2.ChatResponse]:
    """Reads a stream to its end with read() (a call mixing read() and iteration is refused)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def expect_error(stub: gateway_pb2_grpc.GatewayStub, requests: list[gateway_pb2.ChatRequest],
                       metadata: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
    call = stub.Chat(metadata=metadata, timeout=30)
    for request in requests:
        await call.write(request)
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    error = caught.value
    assert "Traceback" not in (error.details() or "")
    assert error.code() != grpc.StatusCode.INTERNAL, error.details()
    return error


async def test_all_five_services_pass_in_consul(live: LiveMesh) -> None:
    for service in SERVICES:
        _, nodes = await live.mesh.consul.health.service(f"lmesh-{service}", passing=True)
        assert nodes, f"lmesh-{service} has no passing instance"
        checks = [c for n in nodes for c in n["Checks"] if c["ServiceName"] == f"lmesh-{service}"]
        assert checks and all(c["Status"] == "passing" for c in checks)
    _, inference = await live.mesh.consul.health.service("lmesh-inference", passing=True)
    assert "smollm2-135m-instruct:1" in inference[0]["Service"]["Meta"]["models"]


async def test_chat_answers_paris_with_finish_and_usage(live: LiveMesh) -> None:
    responses = await collect(await live.gateway(), start(max_tokens=64), live.api_key)
    text = "".join(r.delta for r in responses)
    assert "Paris" in text, text
    last = responses[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert all(r.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert last.model == "smollm2-135m-instruct:1" and last.id.startswith("chatcmpl-")
    usage = last.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens < 64
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_chat_returns_each_tokens_logprob_and_top_alternatives(live: LiveMesh) -> None:
    responses = await collect(await live.gateway(), start(max_tokens=64, logprobs=True, top_logprobs=3),
                              live.api_key)
    last = responses[-1]
    assert last.finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
    entries = [e for r in responses for e in r.logprobs]
    assert len(entries) == last.usage.completion_tokens  # the end-of-turn token is not among them
    text = "".join(r.delta for r in responses)
    assert "Paris" in text
    assert b"".join(e.bytes for e in entries).decode() == text
    sent_text = sent_bytes = 0
    for response in responses:  # an entry never rides on a message before the one completing its text
        sent_text += len(response.delta.encode())
        sent_bytes += sum(len(e.bytes) for e in response.logprobs)
        assert sent_bytes <= sent_text
    for entry in entries:
        assert entry.logprob <= 0.0
        assert entry.token == entry.bytes.decode("utf-8", errors="replace")
        top = entry.top_logprobs
        assert len(top) == 3
        assert [a.logprob for a in top] == sorted((a.logprob for a in top), reverse=True)
        assert top[0].token_id == entry.token_id and top[0].bytes == entry.bytes  # greedy: the most likely
        assert abs(top[0].logprob - entry.logprob) < 1e-5
    # Without logprobs: none, and the same greedy answer.
    plain = await collect(await live.gateway(), start(max_tokens=64), live.api_key)
    assert not any(r.logprobs for r in plain)
    assert "".join(r.delta for r in plain) == text
    # Logprobs alone: no alternatives.
    alone = await collect(await live.gateway(), start(max_tokens=8, logprobs=True), live.api_key)
    assert [len(e.top_logprobs) for r in alone for e in r.logprobs] == [0] * alone[-1].usage.completion_tokens


async def test_chat_logprobs_end_with_the_token_that_completed_a_stop_string(live: LiveMesh) -> None:
    stub = await live.gateway()
    full = [e for r in await collect(stub, start(max_tokens=64, logprobs=True), live.api_key) for e in r.logprobs]
    responses = await collect(stub, start(max_tokens=64, stop=["Paris"], logprobs=True), live.api_key)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    entries = [e for r in responses for e in r.logprobs]
    assert [e.token_id for e in entries] == [e.token_id for e in full[:len(entries)]]
    spelled = b"".join(e.bytes for e in entries)
    assert b"Paris" in spelled and b"Paris" not in b"".join(e.bytes for e in entries[:-1])  # the last completed it
    assert spelled.decode().startswith("".join(r.delta for r in responses))


async def test_max_tokens_ends_with_length(live: LiveMesh) -> None:
    responses = await collect(await live.gateway(), start(LONG_TASK, max_tokens=5), live.api_key)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 5


async def test_stop_string_is_honoured_and_not_emitted(live: LiveMesh) -> None:
    full = "".join(r.delta for r in await collect(await live.gateway(), start(max_tokens=64), live.api_key))
    assert "Paris" in full
    responses = await collect(await live.gateway(), start(max_tokens=64, stop=["Paris"]), live.api_key)
    text = "".join(r.delta for r in responses)
    assert "Paris" not in text and full.startswith(text)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize(("content", "stop", "max_tokens"), [
    ("Name three colors, one per line. Say nothing else.", [], 64),  # the model ends its turn
    (FRANCE, ["."], 64),  # a stop string ends it: the gateway cancels the generation there
    (LONG_TASK, [], 12),  # max_tokens ends it
], ids=["end of turn", "stop string", "length"])
async def test_a_conversations_next_turn_reuses_the_whole_first_turn(live: LiveMesh, content: str, stop: list[str],
                                                                     max_tokens: int) -> None:
    stub = await live.gateway()
    question = gateway_pb2.Message(role="user", content=content)
    first = await collect(stub, gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
        messages=[question], max_tokens=max_tokens, stop=stop)), live.api_key)
    answer = "".join(r.delta for r in first)
    second = await collect(stub, gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
        max_tokens=8, messages=[
            question, gateway_pb2.Message(role="assistant", content=answer),
            gateway_pb2.Message(role="user", content="Three more, please.")])), live.api_key)
    # The first turn's prompt and its answer both came from the prefix cache (the answer re-rendered by the chat
    # template tokenizes as it was generated), all but a last token that was never run (the one max_tokens
    # stopped at) or is not in the next prompt (the one that completed a stop string).
    usage = first[-1].usage
    ended_by_model = first[-1].finish_reason == generation_pb2.FINISH_REASON_STOP and not stop
    expected = usage.prompt_tokens + usage.completion_tokens - (0 if ended_by_model else 1)
    assert second[-1].usage.cached_prompt_tokens == expected, answer


async def test_a_cancel_right_behind_the_start_is_never_lost(live: LiveMesh) -> None:
    """A client sending `start` and `cancel` back to back: the gateway's cancel must not race its own start write on
    the inference stream (grpc refuses a second pending write; the cancel was lost and the chat ended INTERNAL)."""
    from opentelemetry import trace

    from services.gateway.accounting import Meter
    from services.gateway.chat import ChatEnd, ChatParams, ChatService

    chat = ChatService(live.mesh, trace.get_tracer("test"))
    params = ChatParams(model="smollm2-135m-instruct:1", messages=[("user", LONG_TASK)], max_tokens=300,
                        temperature=0.0, top_p=0.0, top_k=0, seed=0, repetition_penalty=0.0, stop=[])
    prepared = await chat.prepare(live.api_key, params)
    version, prompt, max_tokens = prepared.version, prepared.prompt, prepared.max_tokens
    chat.accounts.settle_later(prepared.admission.result().reservation_id, Meter())  # nothing of it is charged
    for _ in range(5):
        cancel = asyncio.Event()
        cancel.set()  # already there when the generation starts: the cancel write races the start write
        events = [e async for e in chat.generate(version, prompt, max_tokens, params, cancel)]
        end = events[-1]
        assert isinstance(end, ChatEnd) and end.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
        assert end.usage.completion_tokens <= 1


async def test_cancel_stops_engine_within_one_step(live: LiveMesh) -> None:
    stub = await live.gateway()
    call = stub.Chat(metadata=auth(live.api_key), timeout=60)
    await call.write(start(LONG_TASK, max_tokens=400))
    received: list[gateway_pb2.ChatResponse] = []
    async for response in call:
        received.append(response)
        if len(received) == 5:
            await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
        if response.finish_reason:
            break
    last = received[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    assert last.usage.completion_tokens < 100
    # Counted at the engine: tokens produced after the cancel reached it.
    spans = await live.otlp.wait_for(lambda spans: any(
        s.service == "lmesh-inference" and s.name == "lmesh.inference/Generate"
        and s.attributes.get("lmesh.inference.cancelled") for s in spans))
    generate = [s for s in spans
                if s.name == "lmesh.inference/Generate" and s.attributes.get("lmesh.inference.cancelled")]
    assert int(generate[-1].attributes["lmesh.inference.tokens_after_cancel"]) <= 1  # type: ignore[call-overload]


async def test_a_client_disconnect_stops_the_engine_within_one_step(live: LiveMesh) -> None:
    def cancelled_generates() -> list:  # type: ignore[type-arg]
        return [s for s in live.otlp.spans if s.service == "lmesh-inference" and s.name == "lmesh.inference/Generate"
                and s.attributes.get("lmesh.inference.cancelled")]

    before = len(cancelled_generates())
    call = (await live.gateway()).Chat(metadata=auth(live.api_key), timeout=60)
    await call.write(start(LONG_TASK, max_tokens=400))
    for _ in range(5):
        assert (await call.read()).delta

    def kv_bytes(e: Endpoint) -> int:
        served = "smollm2-135m-instruct:1" in e.meta.get("models", "").split(",")
        return int(e.meta.get("load_kv_bytes", "0")) if served else 0

    # While it decodes, the replica's reported KV memory keeps growing (not only when a sequence joins or leaves).
    inference = live.mesh.resolver("lmesh-inference")
    first = kv_bytes(await inference.wait_for(lambda e: kv_bytes(e) > 0, timeout=10))
    await inference.wait_for(lambda e: kv_bytes(e) > first, timeout=10)
    call.cancel()  # no Cancel message: the stream is dropped, as when a client goes away
    await live.otlp.wait_for(lambda spans: len(cancelled_generates()) > before, timeout=20)
    dropped = cancelled_generates()[-1]
    assert int(dropped.attributes["lmesh.inference.tokens_after_cancel"]) <= 1  # type: ignore[call-overload]
    assert int(dropped.attributes["gen_ai.usage.output_tokens"]) < 400  # type: ignore[call-overload]  # cut short
    # The sequence left the engine: the replica reports no active sequence (its meta updates within a second).
    await inference.wait_for(
        lambda e: "smollm2-135m-instruct:1" in e.meta.get("models", "").split(",")
        and e.meta.get("load_active") == "0", timeout=10)


async def detokenized_in_gateway(live: LiveMesh) -> None:
    """Waits until the gateway detokenizes SmolLM2's answers itself (byte-level vocabulary: it checks that once, on
    its first chat, whose answer the tokenizer's stream detokenizes)."""
    await collect(await live.gateway(), start(max_tokens=2), live.api_key)
    deadline = time.monotonic() + 20
    while "smollm2-135m-instruct:1: answers are detokenized in the gateway" not in live.procs.log("gateway"):
        assert time.monotonic() < deadline, "the gateway never said how it detokenizes SmolLM2's answers"
        await asyncio.sleep(0.1)


async def rendered_in_gateway(live: LiveMesh) -> None:
    """Waits until the gateway renders SmolLM2's prompts itself (it loads the version's tokenizer and checks it
    against lmesh-tokenizer once, on its first chat, whose prompt the tokenizer renders)."""
    await collect(await live.gateway(), start(max_tokens=1), live.api_key)
    deadline = time.monotonic() + 20
    while "smollm2-135m-instruct:1: prompts are rendered in the gateway" not in live.procs.log("gateway"):
        assert time.monotonic() < deadline, "the gateway never said how it renders SmolLM2's prompts"
        await asyncio.sleep(0.1)


def trace_of(spans: list, completion_id: str) -> set[str]:  # type: ignore[type-arg]
    """`service|span name` of every span in the trace of the chat answered as `completion_id`."""
    roots = [s for s in spans
             if s.name == "lmesh.gateway/Chat" and s.attributes.get("gen_ai.response.id") == completion_id]
    if not roots:
        return set()
    return {f"{s.service}|{s.name}" for s in spans if s.trace_id == roots[0].trace_id}


async def test_one_chat_is_one_trace_across_all_services(live: LiveMesh) -> None:
    await detokenized_in_gateway(live)
    await rendered_in_gateway(live)
    # A reference no other test uses, so the gateway's short resolution cache cannot skip the registry. The prompt
    # is longer than the gateway renders itself: lmesh-tokenizer renders it.
    long_question = "Name the capital of France, please. " * 240
    responses = await collect(await live.gateway(), start(long_question, model="smollm2-135m-instruct:1",
                                                          max_tokens=8), live.api_key)
    completion_id = responses[-1].id

    # No Authenticate: the key chatted a moment ago, so the gateway remembers its principal (RecentPrincipals),
    # and Reserve authenticates it.
    wanted = {"lmesh-gateway|lmesh.gateway/Chat", "lmesh-policy|lmesh.policy/Reserve",
              "lmesh-policy|lmesh.policy/Settle",
              "lmesh-registry|lmesh.registry/ResolveModel", "lmesh-tokenizer|lmesh.tokenizer/ApplyChatTemplate",
              "lmesh-inference|lmesh.inference/Generate",
              "lmesh-inference|prefill", "lmesh-inference|decode"}
    await live.otlp.wait_for(lambda spans: wanted <= trace_of(spans, completion_id), timeout=20)
    assert "lmesh-tokenizer|lmesh.tokenizer/DetokenizeStream" not in trace_of(live.otlp.spans, completion_id)
    root = next(s for s in live.otlp.spans if s.attributes.get("gen_ai.response.id") == completion_id)
    assert root.attributes["lmesh.prompt.rendered_by"] == "tokenizer"
    assert root.attributes["gen_ai.usage.output_tokens"] == responses[-1].usage.completion_tokens
    # The gateway hands its completion id to inference, which labels its server span with it.
    generate = next(s for s in live.otlp.spans
                    if s.trace_id == root.trace_id and s.name == "lmesh.inference/Generate")
    assert generate.attributes["lmesh.request_id"] == completion_id
    reason = generation_pb2.FinishReason.Name(responses[-1].finish_reason).removeprefix("FINISH_REASON_").lower()
    assert root.attributes["gen_ai.response.finish_reasons"] == [reason]


async def test_a_short_prompt_is_rendered_in_the_gateway_to_the_tokenizers_ids(live: LiveMesh) -> None:
    await rendered_in_gateway(live)
    messages = [gateway_pb2.Message(role="system", content="Answer in one word."),
                gateway_pb2.Message(role="user", content="Capital of France? <|im_end|> Grüße 🌍")]
    responses = await collect(await live.gateway(), start(messages=messages, max_tokens=4), live.api_key)
    completion_id = responses[-1].id
    await live.otlp.wait_for(lambda spans: "lmesh-inference|prefill" in trace_of(spans, completion_id), timeout=20)
    assert not any(span.startswith("lmesh-tokenizer|") for span in trace_of(live.otlp.spans, completion_id))
    root = next(s for s in live.otlp.spans if s.attributes.get("gen_ai.response.id") == completion_id)
    assert root.attributes["lmesh.prompt.rendered_by"] == "gateway"
    # The prompt inference ran is the one lmesh-tokenizer makes of the same messages.
    from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    tokenizer = (await live.mesh.resolver("lmesh-tokenizer").pick()).stub(tokenizer_pb2_grpc.TokenizerStub)
    rendered = await tokenizer.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(
        model="smollm2-135m-instruct:1", add_generation_prompt=True,
        messages=[tokenizer_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]), timeout=10)
    assert responses[-1].usage.prompt_tokens == len(rendered.token_ids) == root.attributes["gen_ai.usage.input_tokens"]


# An answer ended by the model (its end-of-turn token is not billed) and one ended at a stop string (the gateway
# cancels generation there; what inference sampled after that is not billed either).
@pytest.mark.parametrize("stop", [[], ["Paris"]])
async def test_every_span_bills_what_usage_says(live: LiveMesh, stop: list[str]) -> None:
    responses = await collect(await live.gateway(), start(max_tokens=64, stop=stop), live.api_key)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    completion_id, billed = responses[-1].id, responses[-1].usage.completion_tokens

    def billing_spans(spans: list) -> dict[str, object]:  # type: ignore[type-arg]
        return {s.name: s.attributes.get("gen_ai.usage.output_tokens") for s in spans
                if completion_id in (s.attributes.get("gen_ai.response.id"), s.attributes.get("lmesh.request_id"))}

    await live.otlp.wait_for(lambda spans: len(billing_spans(spans)) == 2, timeout=20)
    assert billing_spans(live.otlp.spans) == {"lmesh.gateway/Chat": billed, "lmesh.inference/Generate": billed}
    generate = next(s for s in live.otlp.spans if s.attributes.get("lmesh.request_id") == completion_id)
    decode = next(s for s in live.otlp.spans if s.name == "decode" and s.parent_span_id == generate.span_id)
    assert decode.attributes["gen_ai.usage.output_tokens"] == billed


@pytest.mark.parametrize(("model", "max_tokens"), [("no-such-model-for-spans", 48), ("default", -7)])
async def test_a_refused_chat_has_a_clean_error_span_that_says_what_was_asked(live: LiveMesh, model: str,
                                                                              max_tokens: int) -> None:
    await expect_error(await live.gateway(), [start(model=model, max_tokens=max_tokens)], auth(live.api_key))

    def refused(spans: list) -> list:  # type: ignore[type-arg]
        return [s for s in spans if s.name == "lmesh.gateway/Chat" and s.status_code == "ERROR"
                and s.attributes.get("gen_ai.request.model") == model
                and s.attributes.get("gen_ai.request.max_tokens") == max_tokens]

    chat = (await live.otlp.wait_for(refused, timeout=20))[-1]
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    if model == "default":
        return
    # The unknown model failed inside `authorize`: a status naming the code and the message, no repr of the gRPC
    # error (debug strings) and no exception event with a traceback.
    authorize = next(s for s in live.otlp.spans if s.name == "authorize" and s.trace_id == chat.trace_id)
    assert authorize.status_code == "ERROR"
    assert authorize.status_message == "NOT_FOUND: model 'no-such-model-for-spans' not found"
    assert authorize.events == ()
    assert authorize.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def _with_bad_utf8(request: gateway_pb2.ChatRequest, marker: str) -> bytes:
    """`request` serialized, with `marker` (3 characters in a string field) replaced by a lone UTF-16 surrogate's
    bytes, as a JavaScript client encodes a string that holds half an emoji."""
    data = request.SerializeToString()
    assert data.count(marker.encode()) == 1 and len(marker.encode()) == 3
    return data.replace(marker.encode(), b"\xed\xa0\xbd")


@pytest.mark.parametrize("case", ["bad utf-8 in content", "bad utf-8 in stop", "garbage bytes"])
async def test_a_request_that_cannot_be_decoded_is_invalid_argument(live: LiveMesh, case: str) -> None:
    if case == "garbage bytes":
        first = b"\xff\xff\xff\xff\x0f"
    elif case == "bad utf-8 in content":
        first = _with_bad_utf8(start("Tell me about XYZ"), "XYZ")
    else:
        first = _with_bad_utf8(start(stop=["XYZ"]), "XYZ")
    gateway = await live.mesh.resolver("lmesh-gateway").pick()
    chat = gateway.channel.stream_stream("/lmesh.gateway.v1.Gateway/Chat")
    call = chat(metadata=auth(live.api_key), timeout=30)
    await call.write(first)
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert (caught.value.details() or "").startswith("request: the message could not be decoded")
    # The same for a unary call, and before any key is looked at.
    list_models = gateway.channel.unary_unary("/lmesh.gateway.v1.Gateway/ListModels")
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await list_models(b"\xff\xff\xff\xff\x0f", timeout=30)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (unary.value.details() or "").startswith("request: the message could not be decoded")


async def test_an_undecodable_message_after_a_valid_start_is_skipped(live: LiveMesh) -> None:
    gateway = await live.mesh.resolver("lmesh-gateway").pick()
    call = gateway.channel.stream_stream("/lmesh.gateway.v1.Gateway/Chat")(metadata=auth(live.api_key), timeout=60)
    await call.write(start(max_tokens=16).SerializeToString())
    await call.write(b"\xff\xff\xff\xff\x0f")
    await call.done_writing()
    responses = [gateway_pb2.ChatResponse.FromString(r) async for r in call]
    assert responses[-1].finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)


async def test_a_request_over_4_mib_is_refused_by_the_gateway_at_once(live: LiveMesh) -> None:
    call = (await live.gateway()).Chat(metadata=auth(live.api_key), timeout=30)
    await call.write(start("word " * (900 * 1024)))  # 4.5 MB
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def test_a_burst_of_prompts_that_cannot_fit_leaves_the_tokenizer_small_and_other_chats_alone(
        live: LiveMesh) -> None:
    """Eight 4 MB emoji prompts at once took the tokenizer to 4 GB (kept afterwards), failed its health check and
    unrelated chats. Those whose size shows they cannot fit are refused before encoding; those that need encoding
    to know take turns within a bounded budget, in a worker thread; small chats go on meanwhile."""
    stub = await live.gateway()
    tokenizer_pid = live.procs.processes["tokenizer"].process.pid
    emoji, words = "😀" * 1_040_000, "hello " * 100_000  # 4.16 MB; 0.6 MB of ~100,000 tokens
    burst = [asyncio.create_task(expect_error(stub, [start(text)], auth(live.api_key)))
             for text in (emoji, words) * 4]
    small_chats: list[list[gateway_pb2.ChatResponse]] = []
    passing: list[bool] = []
    while not all(task.done() for task in burst) or len(small_chats) < 3:
        small_chats.append(await collect(stub, start(max_tokens=2), live.api_key, timeout=30))
        passing.append(bool(await live.mesh.resolver("lmesh-tokenizer").passing()))
        await asyncio.sleep(0.3)
    for error in await asyncio.gather(*burst):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in (error.details() or "")
        assert "fit the model's context" in (error.details() or "")
    assert all(chat[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH for chat in small_chats)
    assert all(passing)
    assert _rss_bytes(tokenizer_pid) < 1_500_000_000


async def test_bad_input_maps_to_exact_codes(live: LiveMesh) -> None:
    stub = await live.gateway()
    key = auth(live.api_key)
    cases: list[tuple[list[gateway_pb2.ChatRequest], tuple[tuple[str, str], ...], grpc.StatusCode, str]] = [
        ([start(model="no-such-model")], key, grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ([start(model="smollm2-135m-instruct:")], key, grpc.StatusCode.INVALID_ARGUMENT, "model:"),
        ([start(model=":1")], key, grpc.StatusCode.INVALID_ARGUMENT, "model:"),
        ([start()], (), grpc.StatusCode.UNAUTHENTICATED, "key"),
        ([start(model="no-such-model")], (), grpc.StatusCode.UNAUTHENTICATED, "key"),  # no probing without a key
        ([start(model="no-such-model")], auth("lmk_wrong"), grpc.StatusCode.UNAUTHENTICATED, "key"),
        ([start()], auth("lmk_wrong"), grpc.StatusCode.UNAUTHENTICATED, "key"),
        ([start(messages=[])], key, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        ([start(max_tokens=0)], key, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ([start(max_tokens=-3)], key, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        # More turns than the context has tokens: refused before anything renders them.
        ([start(messages=[gateway_pb2.Message(role="user", content="")] * 9000)], key,
         grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        ([start("hello " * 9000)], key, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        ([gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel())], key, grpc.StatusCode.INVALID_ARGUMENT, "start"),
        ([], key, grpc.StatusCode.INVALID_ARGUMENT, "start"),
        ([start(messages=[gateway_pb2.Message(role="wizard", content="hi")])], key,
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
        ([start(temperature=3.0)], key, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ([start(top_p=1.5)], key, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ([start(frequency_penalty=2.5)], key, grpc.StatusCode.INVALID_ARGUMENT, "frequency_penalty: must be in"),
        ([start(logit_bias={-1: 1.0})], key, grpc.StatusCode.INVALID_ARGUMENT, "logit_bias: token id -1"),
        ([start(logit_bias={5: 100.5})], key, grpc.StatusCode.INVALID_ARGUMENT, "logit_bias: biases must be in"),
        # Only the replica knows its vocabulary: its refusal, under the name the request used.
        ([start(logit_bias={10**6: 1.0})], key, grpc.StatusCode.INVALID_ARGUMENT,
         "logit_bias: token id 1000000 is outside the vocabulary [0, 49152)"),
        ([start(stop=["a", "b", "c", "d", "e"])], key, grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        ([start(logprobs=True, top_logprobs=21)], key, grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
        ([start(logprobs=True, top_logprobs=-1)], key, grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
        ([start(top_logprobs=3)], key, grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
        # A malformed request is INVALID_ARGUMENT with or without a key (the form is checked first), a malformed
        # model reference included.
        *(([start(model=model)], metadata, grpc.StatusCode.INVALID_ARGUMENT, "model")
          for model in ("a b", ":", "\x00", "m" * 200_000, "default:", "Up:1") for metadata in (key, ())),
        ([start(max_tokens=0)], (), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ([start(messages=[gateway_pb2.Message(role="wizard", content="hi")])], auth("lmk_wrong"),
         grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role"),
    ]
    for requests, metadata, code, field in cases:
        error = await expect_error(stub, requests, metadata)
        assert error.code() == code, (requests, error.details())
        assert field in (error.details() or ""), (field, error.details())


def typed_details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The google.rpc details of `error`'s `grpc-status-details-bin` trailer, by type name (what a client in any
    language reads instead of parsing the message); from_call also checks its code and message are the call's."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    assert status is not None, f"no typed details: {error.code()} {error.details()}"
    found: dict[str, Any] = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo,
                    error_details_pb2.QuotaFailure):
            if detail.Is(cls.DESCRIPTOR):
                found[cls.__name__] = message = cls()
                detail.Unpack(message)
    assert found["ErrorInfo"].domain == "lmesh.dev"
    return found


async def test_errors_through_the_gateway_carry_typed_details(live: LiveMesh) -> None:
    """Its own (a bad field, no key) and relayed ones (the registry's unknown model, policy's wrong key)."""
    stub = await live.gateway()
    key = auth(live.api_key)
    cases: list[tuple[gateway_pb2.ChatRequest, tuple[tuple[str, str], ...], str, str]] = [
        (start(max_tokens=0), key, "INVALID_FIELD", "max_tokens"),
        (start(messages=[gateway_pb2.Message(role="wizard", content="hi")]), key, "INVALID_FIELD",
         "messages[0].role"),
        (start(model="smollm2-135m-instruct:"), key, "INVALID_FIELD", "model"),  # the registry's, renamed
        (start(model="no-such-model"), key, "MODEL_NOT_FOUND", ""),
        (start(), (), "UNAUTHENTICATED", ""),
        (start(), auth("lmk_wrong"), "UNAUTHENTICATED", ""),
    ]
    for request, metadata, reason, field in cases:
        error = await expect_error(stub, [request], metadata)
        details = typed_details(error)
        assert details["ErrorInfo"].reason == reason, (reason, error.details())
        if field:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in details["BadRequest"].field_violations] == [field]
            assert details["ErrorInfo"].metadata["field"] == field
        else:
            assert "BadRequest" not in details
    assert typed_details(await expect_error(stub, [start(model="no-such-model")], key))["ErrorInfo"].metadata[
        "model"] == "no-such-model"


async def test_any_int64_seed_samples_reproducibly(live: LiveMesh) -> None:
    answers = {"".join(r.delta for r in await collect(await live.gateway(),
                                                       start(max_tokens=8, temperature=0.9, seed=-(2**63)),
                                                       live.api_key)) for _ in range(2)}
    assert len(answers) == 1 and answers != {""}


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
async def test_reflection_describes_the_public_api_without_proto_files(live: LiveMesh, package: str) -> None:
    """What grpcurl and buf curl do: list the services, then fetch the file that defines one."""
    from grpc_reflection.v1alpha import reflection_pb2

    endpoint = await live.mesh.resolver("lmesh-gateway").pick()
    info = endpoint.channel.stream_stream(
        f"/{package}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    call = info(timeout=10)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = await call.read()
    services = {s.name for s in listed.list_services_response.service}
    assert {"lmesh.gateway.v1.Gateway", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= services
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="lmesh.gateway.v1.ChatStart"))
    described = await call.read()
    await call.done_writing()
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    gateway = next(f for f in files if f.package == "lmesh.gateway.v1")
    # The shared types' file comes along, so a tool resolves ChatResponse's fields without the proto files.
    assert "lmesh/common/v1/generation.proto" in {f.name for f in files}
    response = next(m for m in gateway.message_type if m.name == "ChatResponse")
    assert {f.name: f.type_name for f in response.field}["finish_reason"] == ".lmesh.common.v1.FinishReason"
    assert [m.name for m in gateway.service[0].method] == ["Chat", "ListModels", "Embed"]
    start = next(m for m in gateway.message_type if m.name == "ChatStart")
    assert {"model", "messages", "max_tokens", "logprobs", "top_logprobs"} <= {f.name for f in start.field}
    # Every listed service can be described (`buf curl --list-methods` and `grpcurl describe` ask for each).
    call = info(timeout=10)
    for name in sorted(services):
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
        answer = await call.read()
        assert not answer.HasField("error_response"), (name, answer.error_response.error_message)
        described_files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                           for raw in answer.file_descriptor_response.file_descriptor_proto]
        assert any(f"{f.package}.{svc.name}" == name for f in described_files for svc in f.service), name
    await call.done_writing()


async def test_a_key_restricted_to_models_is_judged_on_the_model_behind_an_alias(live: LiveMesh) -> None:
    policy = live.mesh.peer(POLICY)
    smollm = await create_key(policy, "restricted", allowed_models=["smollm2-*"])
    other = await create_key(policy, "restricted", allowed_models=["other-*"])
    stub = await live.gateway()
    for reference in ("", "default", "smollm2-135m-instruct", "smollm2-135m-instruct:1"):
        answer = await collect(stub, start(model=reference, max_tokens=4), smollm.api_key)
        assert answer[-1].model == "smollm2-135m-instruct:1"
        error = await expect_error(stub, [start(model=reference, max_tokens=4)], auth(other.api_key))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    # What ListModels offers a key is exactly what Chat lets it use.
    listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(smollm.api_key))
    assert "smollm2-135m-instruct:1" in {m.id for m in listed.models}
    listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(other.api_key))
    assert not listed.models


async def test_a_key_revoked_while_the_gateway_remembers_it_gets_no_tokens(live: LiveMesh) -> None:
    policy = live.mesh.peer(POLICY)
    created = await create_key(policy, "revoked-soon")
    stub = await live.gateway()
    answer = await collect(stub, start(max_tokens=2), created.api_key)  # the gateway now remembers the key
    assert answer[-1].usage.completion_tokens > 0
    await revoke_key(policy, created.key.key_id)
    error = await expect_error(stub, [start(max_tokens=2)], auth(created.api_key))  # Reserve checks it again
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()


async def test_list_models_needs_a_key(live: LiveMesh) -> None:
    stub = await live.gateway()
    listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(live.api_key))
    ids = {m.id: m for m in listed.models}
    assert "default" in ids["smollm2-135m-instruct:1"].aliases
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListModels(gateway_pb2.ListModelsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def node_client_modules() -> Path:
    """node_modules for tests/clients/node, installed once per lock file into the cache (npm ci)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are not installed: the Node.js client check needs them")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 18:
        pytest.skip(f"node {version} is older than 18 (the client uses the built-in fetch)")
    source = ROOT / "tests" / "clients" / "node"
    lock = (source / "package-lock.json").read_bytes()
    target = lmesh_cache() / "node-client" / hashlib.sha256(lock).hexdigest()[:16]
    if not (target / "node_modules" / ".package-lock.json").exists():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(source / name, target / name)
        installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=target,
                                   capture_output=True, text=True, timeout=300)
        if installed.returncode != 0:  # the npm registry is out of reach: nothing of ours to judge
            pytest.skip(f"npm ci failed: {installed.stderr.strip()[-300:]}")
    return target / "node_modules"


async def run_node_client(live: LiveMesh, **env: str) -> dict[str, Any]:
    """What tests/clients/node/chat.js saw, run with `env` on top of the test's (LMESH_API_KEY: the live key)."""
    modules = node_client_modules()
    env = {**os.environ, "NODE_PATH": str(modules), "LMESH_API_KEY": live.api_key,
           "CONSUL_HTTP_ADDR": live.procs.consul_addr, **env}
    process = await asyncio.create_subprocess_exec(
        "node", str(ROOT / "tests" / "clients" / "node" / "chat.js"), str(ROOT / "protos"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    seen: dict[str, Any] = json.loads(stdout)
    return seen


async def test_a_node_client_built_from_the_protos_gets_the_documented_contract(live: LiveMesh) -> None:
    """Another language, only protos/ and the README: discovery through Consul, bearer key, Chat, errors."""
    await judge_node_client(live, await run_node_client(live))


async def judge_node_client(live: LiveMesh, seen: dict[str, Any]) -> None:
    listed = {m["id"]: m for m in seen["models"]["models"]}["smollm2-135m-instruct:1"]
    assert listed["aliases"] == ["default"] and listed["served"] is True
    assert seen["models_without_key"]["error"]["code"] == "UNAUTHENTICATED"

    # The same greedy answer, token for token, as this suite's Python client gets.
    python = await collect(await live.gateway(), start(max_tokens=32, logprobs=True), live.api_key)
    greedy = seen["greedy"]
    assert greedy["text"] == "".join(r.delta for r in python) and "Paris" in greedy["text"]
    assert [e["token_id"] for e in greedy["logprobs"]] == [e.token_id for r in python for e in r.logprobs]
    assert bytes.fromhex("".join(e["bytes_hex"] for e in greedy["logprobs"])).decode() == greedy["text"]
    assert all(len(e["top"]) == 2 and e["top"][0] == e["token_id"] for e in greedy["logprobs"])
    assert greedy["finish_reason"] == "FINISH_REASON_STOP" and greedy["unfinished_before_last"]
    assert greedy["model"] == "smollm2-135m-instruct:1" and greedy["id"].startswith("chatcmpl-")
    usage = greedy["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] == \
        python[-1].usage.total_tokens

    assert "Paris" not in seen["stopped"]["text"] and greedy["text"].startswith(seen["stopped"]["text"])
    first, second = seen["seeded"]
    assert first["text"] == second["text"] and first["finish_reason"] == "FINISH_REASON_LENGTH"
    cancelled = seen["cancelled"]
    assert cancelled["finish_reason"] == "FINISH_REASON_CANCELLED" and cancelled["usage"]["completion_tokens"] < 50

    errors = seen["errors"]
    assert {name: error["code"] for name, error in errors.items()} == {
        "no_key": "UNAUTHENTICATED", "wrong_key": "UNAUTHENTICATED", "unknown_model": "NOT_FOUND",
        "max_tokens": "INVALID_ARGUMENT", "temperature": "INVALID_ARGUMENT", "role": "INVALID_ARGUMENT",
        "cancel_first": "INVALID_ARGUMENT"}
    for field in ("max_tokens", "temperature", "role", "cancel_first"):
        named = {"role": "messages[0].role", "cancel_first": "start"}.get(field, field)
        assert errors[field]["details"].startswith(named), errors[field]
        # The same field, typed: decoded from `grpc-status-details-bin` with no lmesh code in the client.
        assert [v["field"] for v in errors[field]["typed"]["BadRequest"]["field_violations"]] == [named]
    assert {name: error["typed"]["ErrorInfo"]["reason"] for name, error in errors.items()} == {
        "no_key": "UNAUTHENTICATED", "wrong_key": "UNAUTHENTICATED", "unknown_model": "MODEL_NOT_FOUND",
        "max_tokens": "INVALID_FIELD", "temperature": "INVALID_FIELD", "role": "INVALID_FIELD",
        "cancel_first": "INVALID_FIELD"}
    assert all(error["typed"]["message"] == error["details"] for error in errors.values())


async def test_the_public_door_over_tls_with_client_certificate_identities(live: LiveMesh, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A second gateway process with TLS from the environment (LMESH_TLS_*): key clients on its TLS port, clients
    with a certificate bound to a key on its client-certificate port, the CLI and the Node.js client on both."""
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("ca")
    server = pki.issue("server", ca, "/CN=gateway", server=True)
    alice, bob, carol = (pki.issue(name, ca, f"/O=e2e/CN={name}") for name in ("alice", "bob", "carol"))
    created = await run_cli(live, "keys", "create", "--tenant", "tls-e2e", "--client-cert-subject", alice.subject)
    assert created.returncode == 0, created.stderr
    assert f"client certificate subject {alice.subject}" in created.stdout
    carols = await create_key(live.mesh.peer(POLICY), "tls-e2e", client_cert_sha256=carol.sha256)
    await revoke_key(live.mesh.peer(POLICY), carols.key.key_id)

    resolver = live.mesh.resolver("lmesh-gateway")
    plain = frozenset(e.service_id for e in resolver.endpoints())
    with monkeypatch.context() as env:  # the process takes it at its start; later ones must not
        env.setenv("LMESH_TLS_CERT", str(server.cert))
        env.setenv("LMESH_TLS_KEY", str(server.key))
        env.setenv("LMESH_TLS_CLIENT_CA", str(ca.cert))
        live.procs.start("gateway", name="gateway-tls")
    try:
        await live.procs.wait_passing(live.mesh, "gateway", name="gateway-tls", exclude=plain)  # Consul's check
        endpoint = next(e for e in resolver.endpoints() if e.service_id not in plain)
        assert endpoint.meta["tls"] == "true"
        public = endpoint.target
        cert_port = f"{endpoint.address}:{endpoint.meta['client_cert_port']}"
        trust = GatewayTls(ca=ca.cert.read_bytes())

        async def answer(target: str, tls: GatewayTls | None, key: str = "") -> str:
            async with public_gateway(target, tls) as stub:
                call = stub.Chat(metadata=auth(key) if key else (), timeout=60)
                await call.write(start(max_tokens=24))
                await call.done_writing()
                return "".join([r.delta async for r in call])

        assert "Paris" in await answer(public, trust, live.api_key)
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await answer(public, None, live.api_key)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        as_alice = GatewayTls(ca=trust.ca, client_cert=alice.cert.read_bytes(), client_key=alice.key.read_bytes())
        assert "Paris" in await answer(cert_port, as_alice)
        async with public_gateway(cert_port, as_alice) as stub:
            listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
            assert "smollm2-135m-instruct:1" in {m.id for m in listed.models}
        for who in (bob, carol):  # bound to nothing; bound to a revoked key
            as_who = GatewayTls(ca=trust.ca, client_cert=who.cert.read_bytes(), client_key=who.key.read_bytes())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await answer(cert_port, as_who)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, who.subject

        # The CLI finds the TLS gateway through Consul: with a CA and a key, then with alice's certificate alone.
        keyed = await run_cli(live, "chat", "--gateway-ca", str(ca.cert), "--key", live.api_key, "--max-tokens",
                              "24", FRANCE)
        assert keyed.returncode == 0 and "Paris" in keyed.stdout, keyed.stderr
        certified = await run_cli(live, "chat", "--gateway-ca", str(ca.cert), "--client-cert", str(alice.cert),
                                  "--client-key", str(alice.key), "--max-tokens", "24", FRANCE)
        assert certified.returncode == 0 and "Paris" in certified.stdout, certified.stderr

        seen = await run_node_client(live, LMESH_GATEWAY_CA=str(ca.cert), LMESH_CLIENT_CERT=str(alice.cert),
                                     LMESH_CLIENT_KEY=str(alice.key))
        assert seen["gateway"] == public
        await judge_node_client(live, seen)  # the whole contract, over TLS
        assert "smollm2-135m-instruct:1" in {m["id"] for m in seen["certificate"]["models"]["models"]}
        assert seen["certificate"]["greedy"]["text"] == seen["greedy"]["text"]
    finally:
        live.procs.terminate("gateway-tls")
        await live.procs.wait_exit("gateway-tls")
        # Gone from this suite's resolver too, so no later test picks it with a plaintext channel.
        for _ in range(300):
            if all(e.service_id in plain for e in resolver.endpoints()):
                break
            await asyncio.sleep(0.1)
        assert all(e.service_id in plain for e in resolver.endpoints())


async def test_sigterm_drains_in_flight_stream_then_deregisters(live: LiveMesh) -> None:
    stub = await live.gateway()
    call = stub.Chat(metadata=auth(live.api_key), timeout=60)
    # Short enough to end within the replica's 5 s grace on a loaded 2-core machine.
    await call.write(start(LONG_TASK, max_tokens=16))
    await call.done_writing()
    first = await call.read()
    assert first.delta
    old_ids = frozenset(e.service_id for e in live.mesh.resolver("lmesh-inference").endpoints()
                        if "smollm2-135m-instruct:1" in e.meta.get("models", "").split(","))
    live.procs.terminate("inference")
    rest = await read_rest(call)
    assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH  # finished, not cut
    assert await live.procs.wait_exit("inference") == 0
    _, nodes = await live.mesh.consul.catalog.service("lmesh-inference")
    assert not {n["ServiceID"] for n in nodes} & old_ids
    live.procs.start("inference")
    await live.procs.wait_passing(live.mesh, "inference", exclude=old_ids, model="smollm2-135m-instruct:1")
    # Passing in this test's view of Consul; the gateway's own watch may hear of it a moment later.
    await answers_paris_again(live)


async def answers_paris_again(live: LiveMesh) -> None:
    """Chats until the gateway answers again (UNAVAILABLE meanwhile, within 30 s), then checks the answer."""
    deadline = time.monotonic() + 30
    while True:
        try:
            responses = await collect(await live.gateway(), start(max_tokens=64), live.api_key)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            await asyncio.sleep(0.5)
    assert "Paris" in "".join(r.delta for r in responses)


async def test_killed_inference_fails_fast_then_recovers(live: LiveMesh) -> None:
    stub = await live.gateway()
    call = stub.Chat(metadata=auth(live.api_key), timeout=60)
    await call.write(start(LONG_TASK, max_tokens=400))
    await call.done_writing()
    assert (await call.read()).delta is not None
    old_ids = frozenset(e.service_id for e in live.mesh.resolver("lmesh-inference").endpoints()
                        if "smollm2-135m-instruct:1" in e.meta.get("models", "").split(","))
    killed_at = time.monotonic()
    live.procs.kill("inference")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_rest(call)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert (caught.value.details() or "").startswith("inference replica ")
    assert time.monotonic() - killed_at < 5
    live.procs.start("inference")
    await live.procs.wait_passing(live.mesh, "inference", exclude=old_ids, model="smollm2-135m-instruct:1")
    # The gateway moves to the new replica through its own Consul watch; nothing else restarts.
    await answers_paris_again(live)


async def test_killed_tokenizer_leaves_answers_in_flight_then_recovers(live: LiveMesh) -> None:
    # The gateway detokenizes SmolLM2's answers itself: an answer already rendered no longer needs the tokenizer.
    await detokenized_in_gateway(live)
    await rendered_in_gateway(live)
    stub = await live.gateway()
    call = stub.Chat(metadata=auth(live.api_key), timeout=60)
    await call.write(start(LONG_TASK, max_tokens=48))
    await call.done_writing()
    first = await call.read()
    assert first.delta
    old_ids = frozenset(e.service_id for e in live.mesh.resolver("lmesh-tokenizer").endpoints())
    live.procs.kill("tokenizer")
    rest = await read_rest(call)
    assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 48
    assert len(first.delta + "".join(r.delta for r in rest)) > 48  # the whole answer's text
    # New chats are rendered in the gateway meanwhile; only a prompt too long for that needs the tokenizer.
    assert "Paris" in "".join(r.delta for r in await collect(await live.gateway(), start(), live.api_key))
    error = await expect_error(await live.gateway(), [start("Tell me about France. " * 400)], auth(live.api_key))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    live.procs.start("tokenizer")
    await live.procs.wait_passing(live.mesh, "tokenizer", exclude=old_ids)
    await answers_paris_again(live)


async def test_chats_go_on_while_the_registry_is_down(live: LiveMesh) -> None:
    from services.gateway.models import RESOLVE_TTL_S

    assert "Paris" in "".join(r.delta for r in await collect(await live.gateway(), start(), live.api_key))
    listed = await (await live.gateway()).ListModels(gateway_pb2.ListModelsRequest(), metadata=auth(live.api_key))
    old_ids = frozenset(e.service_id for e in live.mesh.resolver("lmesh-registry").endpoints())
    stale_line = "registry unavailable; serving the last answer for 'default'"
    stale_before = live.procs.log("gateway").count(stale_line)
    live.procs.kill("registry")
    try:
        await asyncio.sleep(RESOLVE_TTL_S + 0.5)  # past the gateway's resolution cache: it must ask, and fail
        responses = await collect(await live.gateway(), start(), live.api_key)
        assert "Paris" in "".join(r.delta for r in responses)
        assert responses[-1].model == "smollm2-135m-instruct:1"
        assert await (await live.gateway()).ListModels(gateway_pb2.ListModelsRequest(),
                                                       metadata=auth(live.api_key)) == listed
        # A model it never resolved cannot be answered without the registry.
        error = await expect_error(await live.gateway(), [start(model="never-resolved")], auth(live.api_key))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        # A tokenizer started now passes but cannot load the model's tokenizer: chats go to the one that can,
        # for the prompt and for detokenizing the answer alike.
        tokenizers = frozenset(e.service_id for e in live.mesh.resolver("lmesh-tokenizer").endpoints())
        live.procs.start("tokenizer", name="tokenizer-cold")
        await live.procs.wait_passing(live.mesh, "tokenizer", name="tokenizer-cold", exclude=tokenizers)
        for _ in range(6):
            responses = await collect(await live.gateway(), start(max_tokens=8), live.api_key)
            assert responses[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED  # ended, not failed
        # Said once for the outage, not once per chat.
        assert live.procs.log("gateway").count(stale_line) == stale_before + 1
    finally:
        if "tokenizer-cold" in live.procs.processes:
            live.procs.terminate("tokenizer-cold")
            await live.procs.wait_exit("tokenizer-cold")
        live.procs.start("registry")
        await live.procs.wait_passing(live.mesh, "registry", exclude=old_ids)


async def test_prefix_reuse_is_visible_in_usage_trace_and_metrics(live: LiveMesh) -> None:
    system = gateway_pb2.Message(role="system", content="You answer in one short sentence. " * 30)
    for question in ("What is the capital of Italy?", "What is the capital of Spain?"):
        messages = [system, gateway_pb2.Message(role="user", content=question)]
        responses = await collect(await live.gateway(), start(messages=messages, max_tokens=12), live.api_key)
    completion_id = responses[-1].id
    assert responses[-1].usage.cached_prompt_tokens > 100

    def hit_prefills(spans: list) -> list:  # type: ignore[type-arg]
        roots = {s.trace_id for s in spans if s.attributes.get("gen_ai.response.id") == completion_id}
        return [s for s in spans if s.name == "prefill" and s.trace_id in roots
                and s.attributes.get("lmesh.inference.prefix_cache_hit")]

    spans = await live.otlp.wait_for(lambda spans: bool(hit_prefills(spans)))
    assert int(hit_prefills(spans)[0].attributes["lmesh.inference.prefix_cached_tokens"]) > 100  # type: ignore[call-overload]
    hits = await live.otlp.wait_for_metric("lmesh-inference", "lmesh.inference.prefix_cache.hits", lambda v: v >= 1)
    assert hits >= 1


async def scrape_all(live: LiveMesh, service: str) -> dict[str, Families]:
    """Every passing instance of lmesh-<service>, found in Consul: its /metrics at address:metrics_port, parsed
    as Prometheus text, by instance id."""
    _, nodes = await live.mesh.consul.health.service(f"lmesh-{service}", passing=True)
    scraped = {}
    for node in nodes:
        port = node["Service"]["Meta"].get("metrics_port", "")
        assert port.isdigit(), f"lmesh-{service} advertises no metrics_port: {node['Service']['Meta']}"
        scraped[node["Service"]["ID"]] = await scrape(int(port), node["Service"]["Address"])
    assert scraped, f"no passing lmesh-{service}"
    return scraped


def total(scraped: dict[str, Families], sample: str, **labels: str) -> float:
    return sum(value(families, sample, **labels) for families in scraped.values())


async def test_prometheus_scrapes_every_service_with_the_deploy_rules_and_the_dashboard_answers(
        live: LiveMesh, prometheus_binary: Path, tmp_path: Path) -> None:
    """A real Prometheus with deploy/prometheus/prometheus.yml's job (its Consul discovery fed from this mesh's
    Consul: tests/prometheus_server.py says why) scrapes every instance at address:metrics_port, and every query of
    deploy/grafana/lmesh-dashboard.json evaluates there, the dashboard's main panels with the chats' data."""
    services = (await live.mesh.consul.catalog.services())[1]
    instances = []
    for name in sorted(n for n in services if n.startswith("lmesh-")):
        instances += (await live.mesh.consul.health.service(name))[1]
    def scraped_as(instance: dict[str, Any]) -> tuple[str, str]:
        service = instance["Service"]
        return service["Service"], f"{service['Address']}:{service['Meta']['metrics_port']}"

    targets = {scraped_as(i) for i in instances if i["Service"]["Meta"].get("metrics_port")}
    wanted = {scraped_as(i) for i in instances if i["Service"]["Meta"].get("metrics_port")
              and all(check["Status"] == "passing" for check in i["Checks"])}
    assert {service for service, _ in wanted} >= {f"lmesh-{s}" for s in SERVICES}
    prometheus = PrometheusServer(prometheus_binary, tmp_path).start(consul_targets(instances))
    try:
        deadline = time.monotonic() + 30
        while True:
            active = (await prometheus.api("targets", state="active"))["activeTargets"]
            up = {(t["labels"].get("service"), t["labels"]["instance"]) for t in active if t["health"] == "up"}
            if up >= wanted or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert up >= wanted, {t["labels"]["instance"]: (t["health"], t["lastError"]) for t in active}
        # Only instances that serve metrics are targets, each at its metrics port, never its gRPC port.
        assert {(t["labels"]["service"], t["labels"]["instance"]) for t in active} == targets

        async def chats_seen() -> float:
            found = (await prometheus.api("query", query='sum(lmesh_gateway_requests_total{lmesh_tenant="e2e"})'))
            return float(found["result"][0]["value"][1]) if found["result"] else 0.0

        # A rate needs two samples of a series: a chat, a scrape that sees it, then the chats the panels show.
        await collect(await live.gateway(), start(max_tokens=8), live.api_key)
        deadline = time.monotonic() + 20
        while True:
            seen = await chats_seen()
            if seen >= 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        for _ in range(2):
            await collect(await live.gateway(), start(max_tokens=8), live.api_key)
        queries = [q.replace("$__rate_interval", "1m") for q in dashboard_queries()]
        shown = {
            "requests": 'sum by (lmesh_tenant, gen_ai_response_model, rpc_response_status_code) (rate(lmesh_gateway_'
                        'requests_total{otel_scope_name="lmesh.gateway"}[1m]))',
            "first token": 'histogram_quantile(0.5, sum by (le) (rate(gen_ai_server_time_to_first_token_seconds_'
                           'bucket{otel_scope_name="lmesh.gateway"}[1m])))',
            "per token": 'histogram_quantile(0.5, sum by (le, gen_ai_request_model) (rate(gen_ai_server_time_per_'
                         'output_token_seconds_bucket{otel_scope_name="lmesh.inference"}[1m])))',
            "tokens": 'sum by (gen_ai_token_type) (rate(lmesh_inference_tokens_total{otel_scope_name="lmesh.'
                      'inference"}[1m]))',
        }
        assert set(shown.values()) <= set(queries), "the dashboard's panels changed: update this test"
        deadline = time.monotonic() + 20
        while True:
            answers = {q: (await prometheus.api("query", query=q))["result"] for q in queries}  # each evaluates
            values = {panel: [float(r["value"][1]) for r in answers[q]] for panel, q in shown.items()}
            if all(any(0 < v < float("inf") for v in vs) for vs in values.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert seen >= 1 and all(any(0 < v < float("inf") for v in vs) for vs in values.values()), values
        requests = answers[shown["requests"]]
        assert any(r["metric"].get("lmesh_tenant") == "e2e" and r["metric"].get("rpc_response_status_code") == "OK"
                   for r in requests), requests
    finally:
        prometheus.stop()


async def test_every_service_serves_prometheus_metrics_whose_counters_move_with_a_chat(live: LiveMesh) -> None:
    every = {service: await scrape_all(live, service) for service in SERVICES}

    def moved() -> dict[str, float]:
        gateway, inference = every["gateway"], every["inference"]
        return {
            "chats": total(gateway, "lmesh_gateway_requests_total", rpc_response_status_code="OK",
                           lmesh_tenant="e2e", gen_ai_response_model="smollm2-135m-instruct:1"),
            "gateway_ttft": total(gateway, "gen_ai_server_time_to_first_token_seconds_count",
                                  otel_scope_name="lmesh.gateway"),
            "chat_rpcs": total(gateway, "rpc_server_call_duration_seconds_count",
                               rpc_method="lmesh.gateway.v1.Gateway/Chat", rpc_response_status_code="OK"),
            "usage_out": total(gateway, "gen_ai_client_token_usage_sum", gen_ai_token_type="output"),
            "ttft": total(inference, "gen_ai_server_time_to_first_token_seconds_count"),
            "gaps": total(inference, "gen_ai_server_time_per_output_token_seconds_count"),
            "out": total(inference, "lmesh_inference_tokens_total", gen_ai_token_type="output"),
            "reserve": total(every["policy"], "rpc_server_call_duration_seconds_count",
                             rpc_method="lmesh.policy.v1.Policy/Reserve", rpc_response_status_code="OK"),
        }

    before = moved()
    responses = await collect(await live.gateway(), start(max_tokens=16), live.api_key)
    completion = responses[-1].usage.completion_tokens
    assert completion > 1
    deadline = time.monotonic() + 10
    while True:  # the gateway counts a chat when its stream has ended on the server, a moment after the client
        every = {service: await scrape_all(live, service) for service in SERVICES}
        after = moved()
        if after["chats"] > before["chats"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    delta = {key: after[key] - before[key] for key in after}
    assert delta["chats"] == 1 and delta["gateway_ttft"] == 1 and delta["chat_rpcs"] == 1, delta
    assert delta["usage_out"] == completion and delta["out"] == completion, delta
    assert delta["ttft"] == 1 and delta["gaps"] == completion - 1, delta  # one observation per token gap
    assert delta["reserve"] >= 1, delta
    # Every metric the Grafana dashboard reads is one the services export.
    exported = {s.name for scraped in every.values() for families in scraped.values()
                for samples in families.values() for s in samples}
    missing = {name for name, _ in dashboard_selectors()} - exported
    assert not missing, missing


async def test_int8_version_is_served_by_its_own_replica(live: LiveMesh) -> None:
    if "inference-int8" not in live.procs.processes:
        pytest.skip("no int8 build (make model builds it)")
    # The int8 weights are weaker (they miss Paris on the France prompt; see the model build's note), so this
    # checks routing and serving, not the answer's quality.
    responses = await collect(await live.gateway(), start(model=INT8, max_tokens=16), live.api_key)
    assert responses[-1].model == INT8
    assert "".join(r.delta for r in responses).strip()
    assert responses[-1].finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
    # Registered after version 1, the variant did not change what the bare name means.
    plain = await collect(await live.gateway(), start(model="smollm2-135m-instruct", max_tokens=4), live.api_key)
    assert plain[-1].model == "smollm2-135m-instruct:1"


async def test_a_version_no_replica_serves_is_unavailable_saying_how_to_serve_it(live: LiveMesh,
                                                                                built_model: Path) -> None:
    if not (built_model / "lmesh_model.fp16.json").exists():
        pytest.skip("no fp16 build (make model builds it)")
    fp16 = "smollm2-135m-instruct:1-fp16"
    with contextlib.suppress(AlreadyExists):
        await register_model_dir(live.mesh.peer(REGISTRY), built_model, aliases=(),
                                 manifest_name="lmesh_model.fp16.json")
    error = await expect_error(await live.gateway(), [start(model=fp16, max_tokens=4)], auth(live.api_key))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == (f"no inference replica serves {fp16}; start one with "
                               f"`lmesh serve inference --model {fp16}`")
    # ListModels tells a client so before it tries (the gateway's model list may lag a registration by seconds).
    stub = await live.gateway()
    for _ in range(100):
        listed = {m.id: m for m in (await stub.ListModels(gateway_pb2.ListModelsRequest(),
                                                          metadata=auth(live.api_key))).models}
        if fp16 in listed:
            break
        await asyncio.sleep(0.1)
    assert not listed[fp16].served and listed["smollm2-135m-instruct:1"].served


async def generate_stream(live: LiveMesh, start_message: inference_pb2.GenerateStart,
                          ) -> list[inference_pb2.GenerateResponse]:
    endpoint = await live.mesh.resolver("lmesh-inference").pick(
        lambda e: start_message.model in e.meta.get("models", "").split(","))
    call = endpoint.stub(inference_pb2_grpc.InferenceStub).Generate(timeout=60)
    await call.write(inference_pb2.GenerateRequest(start=start_message))
    await call.done_writing()
    return await read_rest(call)


async def test_a_full_queue_is_resource_exhausted_at_once_with_retry_after(live: LiveMesh) -> None:
    if "inference-int8" not in live.procs.processes:
        pytest.skip("no int8 build (make model builds it)")
    stub = await live.gateway()

    async def open_chat() -> grpc.aio.StreamStreamCall:
        call = stub.Chat(metadata=auth(live.api_key), timeout=60)
        await call.write(start(LONG_TASK, model=INT8, max_tokens=2000))
        return call

    decoding = await open_chat()
    await decoding.read()  # the int8 replica's one active sequence (--max-active 1 --max-queue 1)
    two = [await open_chat(), await open_chat()]  # one takes the queue's only place, the other is refused
    reads = {asyncio.ensure_future(call.read()): call for call in two}
    try:
        done, _ = await asyncio.wait(reads, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "neither request was refused"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            done.pop().result()
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "queue is full" in (error.details() or "")
        assert dict(error.trailing_metadata() or ())["retry-after-ms"] == "1000"  # relayed by the gateway
        # The replica's typed details, relayed too: why (QUEUE_FULL), which limit, and the same retry delay.
        details = typed_details(error)
        assert details["ErrorInfo"].reason == "QUEUE_FULL"
        assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1000
        [violation] = details["QuotaFailure"].violations
        assert (violation.quota_id, violation.subject, violation.quota_value) == ("inference.queue",
                                                                                 f"model:{INT8}", 1)
    finally:
        for read, call in reads.items():
            if read.done():
                continue
            await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
            await call.done_writing()
            first = await read  # queued, then cancelled: its only message is the finish
            assert first.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
        await decoding.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
        await decoding.done_writing()
        assert (await read_rest(decoding))[-1].finish_reason == generation_pb2.FINISH_REASON_CANCELLED


async def test_a_gateway_at_its_bound_of_chats_refuses_one_more_with_a_retry_delay_then_frees_up(live: LiveMesh,
                                                                                                 ) -> None:
    """A second gateway process with `--max-chats 1`: while one chat holds its place, another is RESOURCE_EXHAUSTED
    (GATEWAY_BUSY, a retry delay) over gRPC and 429 over HTTP, counted in its metrics; once it ends, chats run."""
    resolver = live.mesh.resolver("lmesh-gateway")
    others = frozenset(e.service_id for e in resolver.endpoints())
    live.procs.start("gateway", "--max-chats", "1", name="gateway-busy")
    try:
        await live.procs.wait_passing(live.mesh, "gateway", name="gateway-busy", exclude=others)
        endpoint = next(e for e in resolver.endpoints() if e.service_id not in others)
        stub = endpoint.stub(gateway_pb2_grpc.GatewayStub)
        holding = stub.Chat(metadata=auth(live.api_key), timeout=60)
        await holding.write(start(LONG_TASK, max_tokens=2000))
        assert (await holding.read()).delta  # the one place is taken
        error = await expect_error(stub, [start()], auth(live.api_key))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        retry_ms = int(dict(error.trailing_metadata() or ())["retry-after-ms"])
        details = typed_details(error)
        assert details["ErrorInfo"].reason == "GATEWAY_BUSY"
        assert details["RetryInfo"].retry_delay.ToMilliseconds() == retry_ms >= 50
        [violation] = details["QuotaFailure"].violations
        assert (violation.quota_id, violation.quota_value) == ("gateway.chats", 1)
        async with httpx2.AsyncClient(timeout=30) as client:
            refused = await client.post(f"http://{endpoint.address}:{endpoint.meta['http_port']}/v1/chat/completions",
                                        json={"messages": [{"role": "user", "content": FRANCE}], "max_tokens": 8},
                                        headers={"authorization": f"Bearer {live.api_key}"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "gateway_busy", refused.text
        assert int(refused.headers["retry-after"]) >= 1
        families = await scrape(int(endpoint.meta["metrics_port"]))
        assert value(families, "lmesh_gateway_chats_refused_total") == 2
        assert value(families, "lmesh_gateway_chats_in_flight") == 1 and value(families, "lmesh_gateway_max_chats") == 1
        await holding.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
        await holding.done_writing()
        assert (await read_rest(holding))[-1].finish_reason == generation_pb2.FINISH_REASON_CANCELLED
        answered = await collect(stub, start(max_tokens=16), live.api_key)  # the place is free again
        assert "Paris" in "".join(r.delta for r in answered)
    finally:
        live.procs.terminate("gateway-busy")
        await live.procs.wait_exit("gateway-busy")


async def test_a_replica_with_a_full_queue_is_skipped_for_one_with_room(live: LiveMesh, built_model: Path) -> None:
    if "inference-int8" not in live.procs.processes:
        pytest.skip("no int8 build (make model builds it)")
    from services.model.reference import chat_prompt_ids

    resolver = live.mesh.resolver("lmesh-inference")
    full = await resolver.wait_for(lambda e: INT8 in e.meta.get("models", "").split(","), timeout=10)
    live.procs.start("inference", "--model", INT8, "--max-active", "2", "--max-queue", "1", name="inference-int8b")
    await live.procs.wait_passing(live.mesh, "inference", name="inference-int8b", model=INT8,
                                  exclude=frozenset({full.service_id}))
    direct: list[grpc.aio.StreamStreamCall] = []
    chats: list[grpc.aio.StreamStreamCall] = []
    try:
        # Fill the first replica behind the gateway's back: one sequence decoding, one queued.
        prompt = chat_prompt_ids(built_model, LONG_TASK)
        for _ in range(2):
            call = full.stub(inference_pb2_grpc.InferenceStub).Generate(timeout=60)
            await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
                model=INT8, prompt_token_ids=prompt, max_tokens=2000)))
            direct.append(call)
        await direct[0].read()
        await resolver.wait_for(lambda e: e.service_id == full.service_id and e.meta.get("load_queued") == "1",
                                timeout=10)
        # Two chats at once: the gateway spreads them over both replicas by its own calls in flight, so one
        # lands on the full replica first. Refused there before any token, it must move to the other one (which
        # decodes two at a time).
        stub = await live.gateway()
        for _ in range(2):
            call = stub.Chat(metadata=auth(live.api_key), timeout=60)
            await call.write(start(LONG_TASK, model=INT8, max_tokens=2000))
            chats.append(call)
        firsts = await asyncio.gather(*(call.read() for call in chats), return_exceptions=True)
        assert all(isinstance(f, gateway_pb2.ChatResponse) and f.delta for f in firsts), firsts
    finally:
        for call in chats:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
                await call.done_writing()
            call.cancel()
        for call in direct:
            call.cancel()
        live.procs.terminate("inference-int8b")
        await live.procs.wait_exit("inference-int8b")


async def test_a_version_named_twice_by_a_replica_is_loaded_once(live: LiveMesh, tmp_path: Path) -> None:
    from services.inference.engine import EngineLimits
    from services.inference.follower import ModelFollower, RegistrySource
    from services.inference.loader import load_version

    registry = live.mesh.peer(REGISTRY)
    follower = ModelFollower(RegistrySource(registry), ["default", "smollm2-135m-instruct:1"],
                             lambda v: load_version(registry, v, lmesh_cache() / "artifacts", EngineLimits(), 1))
    try:
        await asyncio.wait_for(follower.start(), 120)
        assert list(follower.models) == ["smollm2-135m-instruct:1"]
        assert follower.meta()["follows"] == "default,smollm2-135m-instruct:1"
    finally:
        await follower.stop()
        await asyncio.gather(*(m.engine.close() for m in follower.models.values()))


async def test_a_stream_outliving_the_drain_grace_ends_unavailable_with_the_reason(live: LiveMesh,
                                                                                     built_model: Path) -> None:
    if "inference-int8" not in live.procs.processes:
        pytest.skip("no int8 build (make model builds it)")
    from services.model.reference import chat_prompt_ids

    resolver = live.mesh.resolver("lmesh-inference")
    known = frozenset(e.service_id for e in resolver.endpoints())
    live.procs.start("inference", "--model", INT8, "--grace", "1", name="inference-short-grace")
    await live.procs.wait_passing(live.mesh, "inference", name="inference-short-grace", model=INT8, exclude=known)
    replica = next(e for e in resolver.endpoints() if e.service_id not in known)
    call = replica.stub(inference_pb2_grpc.InferenceStub).Generate(timeout=60)
    try:
        await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
            model=INT8, prompt_token_ids=chat_prompt_ids(built_model, LONG_TASK), max_tokens=2000)))
        await call.read()
        live.procs.terminate("inference-short-grace")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == ("lmesh-inference shut down before this stream finished (its --grace of 1 s "
                                          "was running out); retry")
        assert await live.procs.wait_exit("inference-short-grace") == 0
    finally:
        call.cancel()


async def test_a_chat_outliving_its_gateways_drain_grace_ends_unavailable_with_the_reason(live: LiveMesh) -> None:
    resolver = live.mesh.resolver("lmesh-gateway")
    known = frozenset(e.service_id for e in resolver.endpoints())
    live.procs.start("gateway", "--grace", "2", name="gateway-short-grace")
    await live.procs.wait_passing(live.mesh, "gateway", name="gateway-short-grace", exclude=known)
    gateway = next(e for e in resolver.endpoints() if e.service_id not in known)
    call = gateway.stub(gateway_pb2_grpc.GatewayStub).Chat(metadata=auth(live.api_key), timeout=60)
    try:
        await call.write(start(LONG_TASK, max_tokens=2000))
        assert (await call.read()).delta is not None
        live.procs.terminate("gateway-short-grace")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == ("lmesh-gateway shut down before this stream finished (its --grace of 2 s "
                                          "was running out); retry")
        assert await live.procs.wait_exit("gateway-short-grace") == 0
    finally:
        call.cancel()


async def test_a_chat_sent_to_a_replica_that_just_died_is_answered_by_another(live: LiveMesh) -> None:
    if "inference-int8" not in live.procs.processes:
        pytest.skip("no int8 build (make model builds it)")
    resolver = live.mesh.resolver("lmesh-inference")
    known = frozenset(e.service_id for e in resolver.endpoints())
    for name in ("inference-int8-x", "inference-int8-y"):
        live.procs.start("inference", "--model", INT8, "--max-active", "4", name=name)
    for name in ("inference-int8-x", "inference-int8-y"):
        await live.procs.wait_passing(live.mesh, "inference", name=name, model=INT8, exclude=known)
        known |= {e.service_id for e in resolver.endpoints()}
    await resolver.wait_for(lambda _: sum(INT8 in e.meta.get("models", "") for e in resolver.endpoints()) == 3,
                            timeout=10)
    # Killed outright: Consul still lists it as passing for a second or two, and so does the gateway.
    live.procs.kill("inference-int8-x")
    try:
        stub = await live.gateway()
        # Three at once over three replicas (the gateway spreads by its own calls in flight): one lands on the
        # dead one, is refused before any token, and must be answered by another.
        answers = await asyncio.gather(*(collect(stub, start(model=INT8, max_tokens=8), live.api_key)
                                         for _ in range(3)), return_exceptions=True)
        assert all(isinstance(a, list) and a[-1].finish_reason for a in answers), answers
    finally:
        live.procs.terminate("inference-int8-y")
        await live.procs.wait_exit("inference-int8-y")


async def test_generate_reports_logprobs_and_top_alternatives(live: LiveMesh) -> None:
    prompt = [1, 4093, 198, 2, 198, 1, 520, 9531, 198]  # a short ChatML-shaped prompt
    responses = await generate_stream(live, inference_pb2.GenerateStart(
        model="smollm2-135m-instruct:1", prompt_token_ids=prompt, max_tokens=6, top_logprobs=3))
    tokens = [t for r in responses if r.HasField("tokens") for t in r.tokens.tokens]
    assert tokens and responses[-1].HasField("finish")
    for token in tokens:
        assert token.logprob <= 0.0
        alternatives = token.top_logprobs
        assert len(alternatives) == 3
        assert [a.logprob for a in alternatives] == sorted((a.logprob for a in alternatives), reverse=True)
        assert alternatives[0].token_id == token.token_id  # greedy picks the most likely
        assert abs(alternatives[0].logprob - token.logprob) < 1e-5


async def test_generate_validates_every_field(live: LiveMesh) -> None:
    model = "smollm2-135m-instruct:1"
    good = {"model": model, "prompt_token_ids": [1, 2, 3], "max_tokens": 4}
    cases: list[tuple[dict[str, object], grpc.StatusCode, str]] = [
        ({**good, "prompt_token_ids": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
        ({**good, "prompt_token_ids": [1, 10**6]}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
        ({**good, "prompt_token_ids": [5] * 9000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
        ({**good, "max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({**good, "top_logprobs": 21}, grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs"),
        ({**good, "stop_token_ids": [-1]}, grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids"),
        ({**good, "sampling": inference_pb2.SamplingParams(temperature=2.5)},
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        ({**good, "sampling": inference_pb2.SamplingParams(top_p=1.5)},
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        ({**good, "sampling": inference_pb2.SamplingParams(top_k=-1)},
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
        ({**good, "sampling": inference_pb2.SamplingParams(repetition_penalty=3.0)},
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.repetition_penalty"),
        ({**good, "sampling": inference_pb2.SamplingParams(presence_penalty=-2.5)},
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.presence_penalty"),
        ({**good, "sampling": inference_pb2.SamplingParams(logit_bias={49152: 1.0})},
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.logit_bias: token id 49152 is outside the vocabulary"),
        ({**good, "request_id": "r" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ({**good, "model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
        ({**good, "model": "other:9"}, grpc.StatusCode.NOT_FOUND, "other:9"),
    ]
    endpoint = await live.mesh.resolver("lmesh-inference").pick(
        lambda e: model in e.meta.get("models", "").split(","))
    stub = endpoint.stub(inference_pb2_grpc.InferenceStub)
    for fields, code, name in cases:
        call = stub.Generate(timeout=30)
        await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(**fields)))  # type: ignore[arg-type]
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call)
        assert caught.value.code() == code, (fields, caught.value.details())
        assert name in (caught.value.details() or ""), (name, caught.value.details())
    call = stub.Generate(timeout=30)
    await call.write(inference_pb2.GenerateRequest(cancel=inference_pb2.CancelGeneration()))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_rest(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start" in (caught.value.details() or "")


async def test_client_deadline_reaches_the_engine(live: LiveMesh) -> None:
    stub = await live.gateway()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, start(LONG_TASK, max_tokens=400), live.api_key, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


async def run_cli(live: LiveMesh, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**live.procs.env(), "LMESH_HOME": str(live.procs.home / "cli")}
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "services.cli", *args], env=env,
                                   capture_output=True, text=True, timeout=120, cwd=ROOT)


async def test_cli_register_points_named_aliases_also_at_a_version_already_registered(live: LiveMesh,
                                                                                        built_model: Path) -> None:
    if not (built_model / "lmesh_model.fp16.json").exists():
        pytest.skip("no fp16 build (make model builds it)")
    args = ("models", "register", str(built_model), "--manifest", "lmesh_model.fp16.json")
    for alias in ("e2e-half", "e2e-half-2"):  # the first may register it; the second finds it registered
        result = await run_cli(live, *args, "--alias", alias)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("registered smollm2-135m-instruct:1-fp16 (aliases: ")
        assert alias in result.stdout.strip().removesuffix(")").split("aliases: ")[1].split(", ")


async def test_interactive_cli_chat_survives_a_failed_turn_and_keeps_the_conversation(live: LiveMesh) -> None:
    env = {**live.procs.env(), "LMESH_HOME": str(live.procs.home / "cli"), "LMESH_API_KEY": live.api_key}
    turns = f"{'word ' * 9000}\n{FRANCE}\nAnd of Italy?\n"
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "services.cli", "chat", "--max-tokens",
                                                      "24"], input=turns, env=env, capture_output=True, text=True,
                                     timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().startswith("lmesh: INVALID_ARGUMENT: messages: the prompt is ")
    assert result.stderr.count("\n") == 2  # the blank line closing the prompt, then the error's one line
    answers = result.stdout.split("you> ")[1:]
    assert len(answers) == 4 and "Paris" in answers[1] and "Rome" in answers[2]  # the last one met the end


async def test_cli_creates_a_key_that_chats(live: LiveMesh) -> None:
    created = await run_cli(live, "keys", "create", "--tenant", "cli-team")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("lmk_") and " " not in key
    answer = await run_cli(live, "chat", "--key", key, "--max-tokens", "48", FRANCE)
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout
    detailed = await run_cli(live, "chat", "--key", key, "--max-tokens", "6", "--logprobs", "2", FRANCE)
    assert detailed.returncode == 0, detailed.stderr
    lines = detailed.stdout.splitlines()
    footer = next(i for i, line in enumerate(lines) if line.startswith("[smollm2-135m-instruct:1 "))
    assert "6 completion tokens" in lines[footer]
    table = lines[footer + 1:]  # a token, its logprob, then two alternatives with theirs
    assert len(table) == 6 and all(float(line.split()[-1]) <= 0 for line in table), table
    sampled = [await run_cli(live, "chat", "--key", key, "--max-tokens", "24", "--temperature", "0.9",
                             "--top-p", "0.95", "--top-k", "40", "--seed", "-7", "--repetition-penalty", "1.1",
                             "--presence-penalty", "0.5", "--frequency-penalty", "-0.5", "--stop", "Paris", FRANCE)
               for _ in range(2)]
    assert sampled[0].returncode == 0, sampled[0].stderr
    assert sampled[0].stdout == sampled[1].stdout and "Paris" not in sampled[0].stdout.splitlines()[0]
    refused = await run_cli(live, "chat", "--key", key, "--presence-penalty", "3", FRANCE)
    assert refused.returncode != 0 and "presence_penalty: must be in [-2, 2]" in refused.stderr, refused.stderr
    listed = await run_cli(live, "models", "list")
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("smollm2-135m-instruct:1 "))
    assert row[1] == "default" and row[-1] == "1"  # one passing replica serves it
    keys = await run_cli(live, "keys", "list", "--tenant", "cli-team")
    assert "cli-team" in keys.stdout and key not in keys.stdout
    # What policy refuses is said under the flag (and the value) typed, not policy's own field names.
    for flags, said in [(("--model", "smollm2-*", "--model", "a b"), "--model 'a b': must not contain whitespace"),
                        (("--tools", "calculator,Bad-Name"), "--tools 'Bad-Name': must be a tool name"),
                        (("--max-priority", "10"), "--max-priority: must be in [0, 9]")]:
        bad = await run_cli(live, "keys", "create", "--tenant", "cli-team", *flags)
        assert bad.returncode == 2 and bad.stderr.startswith(f"lmesh: INVALID_ARGUMENT: {said}"), bad.stderr


async def test_the_audit_log_verifies_after_a_busy_run_and_holds_no_key(live: LiveMesh) -> None:
    """Chats and direct Authorize calls at once, with a key revoked among them: `lmesh audit tail --follow` shows
    each decision as it becomes durable, `lmesh audit verify` passes, each record carries the trace it was decided
    in, and no API key is in the audit log, any service's log or any span."""
    policy = live.mesh.peer(POLICY)
    created = await create_key(policy, "e2e-audit", ["smollm2-*"])
    doomed = await create_key(policy, "e2e-audit")
    keys = [live.api_key, created.api_key, doomed.api_key]
    env = {**live.procs.env(), "LMESH_HOME": str(live.procs.home / "cli")}
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "audit", "tail", "--follow", "-n", "0", "--json", "--tenant",
        "e2e-audit", env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert follower.stdout is not None and follower.stderr is not None
    seen: list[dict[str, Any]] = []
    try:
        note = await asyncio.wait_for(follower.stderr.readline(), 60)
        assert note.startswith(b"lmesh: following the audit log from #"), note
        stub = await live.gateway()

        async def authorize(i: int) -> None:
            await policy.call(lambda p: p.Authorize, policy_pb2.AuthorizeRequest(
                api_key=created.api_key, model="default", resolved_model="smollm2-135m-instruct:1", input_tokens=i,
                max_tokens=8), timeout=30)

        chats = [collect(stub, start(max_tokens=8), key) for key in (created.api_key, live.api_key) * 3]
        await asyncio.gather(*chats, *(authorize(i) for i in range(150)), revoke_key(policy, doomed.key.key_id))
        refused = await expect_error(stub, [start(max_tokens=8)], auth(doomed.api_key))
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        # 150 authorizations, the revocation, and for the 3 chats of the tenant's key: authenticate, reserve and
        # settle each (the refused chat's key was revoked: its authentication is denied).
        wanted = Counter({("authorize", "allowed"): 150, ("key.revoke", "ok"): 1, ("authenticate", "allowed"): 3,
                          ("reserve", "allowed"): 3, ("settle", "charged"): 3})
        while Counter((r["action"], r["outcome"]) for r in seen) & wanted != wanted:
            seen.append(json.loads(await asyncio.wait_for(follower.stdout.readline(), 30)))
    finally:
        follower.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(follower.communicate(), 30)
    assert follower.returncode == 130 and b"Traceback" not in err, err
    kinds = Counter((r["action"], r["outcome"]) for r in seen)
    assert set(kinds) <= {*wanted, ("authenticate", "denied")}, kinds
    assert {r["model"] for r in seen if r["action"] in ("authorize", "reserve", "settle")} == {
        "smollm2-135m-instruct:1"}
    assert [r["seq"] for r in seen] == sorted(r["seq"] for r in seen)

    verified = await run_cli(live, "audit", "verify")
    assert verified.returncode == 0, verified.stderr
    assert re.fullmatch(r"ok: \d+ records, #1 to #\d+, head sha256 [0-9a-f]{64}\n", verified.stdout), verified.stdout
    tail = await run_cli(live, "audit", "tail", "-n", "3", "--principal", created.key.key_id, "--action",
                         "authorize")
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3, tail
    assert all(f" authorize allowed principal={created.key.key_id} tenant=e2e-audit " in line
               for line in tail.stdout.splitlines())

    # Every record names the trace it was decided in: policy's own span of that call.
    traces = {r["trace_id"] for r in seen if r["action"] == "authorize"}
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in traces) and len(traces) == 150
    spans = await live.otlp.wait_for(lambda spans: traces <= {s.trace_id for s in spans
                                                              if s.name == "lmesh.policy/Authorize"}, timeout=20)

    audit_text = "".join(p.read_text() for p in (live.procs.home / "policy" / "audit").glob("*.jsonl"))
    logs = "\n".join(live.procs.log(name) for name in live.procs.processes)
    span_text = "\n".join(f"{s.name} {s.status_message} {s.attributes} {s.events}" for s in spans)
    for where, text in (("audit log", audit_text), ("service logs", logs), ("spans", span_text),
                        ("CLI output", f"{out.decode()}{verified.stdout}{tail.stdout}{json.dumps(seen)}")):
        assert not re.search(r"lmk_[A-Za-z0-9_-]{43}", text), f"an API key in the {where}"
        for key in keys:
            assert key[4:] not in text, f"an API key in the {where}"


async def test_dev_mesh_says_make_clean_when_an_older_build_holds_the_version(live: LiveMesh, built_model: Path,
                                                                             tmp_path: Path) -> None:
    from services.devmesh import ensure_model

    other = tmp_path / "other-build"
    other.mkdir()
    for name in ("lmesh_model.json", "model.onnx"):
        (other / name).symlink_to(built_model / name)
    (other / "tokenizer.json").write_bytes((built_model / "tokenizer.json").read_bytes() + b"\n")
    with pytest.raises(AlreadyExists, match="make clean"):
        await ensure_model(live.mesh, other)
    assert await ensure_model(live.mesh, built_model) == "smollm2-135m-instruct:1"  # the same build is fine


def run_dev_cli(built_model: Path, home: Path, gateway_port: int, http_port: int = 0,
                ) -> subprocess.CompletedProcess[str]:
    from services.common.consul_agent import free_port

    env = {**os.environ, "LMESH_HOME": str(home), "LMESH_GATEWAY_PORT": str(gateway_port),
           "LMESH_HTTP_PORT": str(http_port or free_port())}  # not 8080: something may hold it on this machine
    return subprocess.run([sys.executable, "-m", "services.cli", "dev", "--model-dir", str(built_model)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_dev_mesh_refuses_a_second_mesh_on_the_same_home(built_model: Path, tmp_path: Path) -> None:
    from services.devmesh import hold_home_lock

    (tmp_path / "logs").mkdir()
    held = hold_home_lock(tmp_path)
    assert not isinstance(held, str)
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        result = run_dev_cli(built_model, tmp_path, free_port)
    finally:
        held.close()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"lmesh: a mesh using {tmp_path} is already running (pid {os.getpid()}); "
                                     f"stop it (Ctrl-C where it runs, or `kill {os.getpid()}`) or use another "
                                     "LMESH_HOME")
    again = hold_home_lock(tmp_path)  # free once its holder is gone
    assert not isinstance(again, str)
    again.close()


async def test_dev_mesh_refuses_to_start_a_second_mesh_in_an_agent_that_holds_one(
        live: LiveMesh, consul_agent: ConsulAgent, built_model: Path, tmp_path: Path) -> None:
    """Another LMESH_HOME, the same Consul: its services would mix with the running mesh's (one registry's models,
    the other's keys), so it stops before starting anything."""
    from services.common.consul_agent import free_ports

    gateway = await live.mesh.resolver("lmesh-gateway").pick()
    ports = free_ports(2)  # not 50051 and 8080: a `make run` may hold them
    env = {**os.environ, "CONSUL_HTTP_ADDR": consul_agent.http_addr, "LMESH_HOME": str(tmp_path),
           "LMESH_GATEWAY_PORT": str(ports[0]), "LMESH_HTTP_PORT": str(ports[1])}
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "services.cli", "dev", "--model-dir",
                                                      str(built_model)], env=env, capture_output=True, text=True,
                                     timeout=60)
    assert result.returncode == 2 and not (tmp_path / "dev-api-key").exists()
    assert result.stderr == (f"lmesh: a mesh already runs in the Consul agent at {consul_agent.http_addr} "
                             f"(lmesh-gateway at {gateway.target}); use it (`lmesh chat`), stop it, or point "
                             "CONSUL_HTTP_ADDR at another agent\n")


def test_dev_mesh_names_a_service_that_refuses_to_start_and_why(built_model: Path, tmp_path: Path) -> None:
    """Every service refuses an unsupported OTEL_TRACES_EXPORTER: `lmesh dev` stops at once (not after waiting for
    the registry), with the service's own one-line reason, and leaves nothing running."""
    from services.common.consul_agent import free_ports

    ports = free_ports(3)
    env = {**os.environ, "LMESH_HOME": str(tmp_path), "LMESH_GATEWAY_PORT": str(ports[0]),
           "LMESH_HTTP_PORT": str(ports[1]), "CONSUL_HTTP_ADDR": f"127.0.0.1:{ports[2]}",
           "OTEL_TRACES_EXPORTER": "zipkin"}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "services.cli", "dev", "--model-dir", str(built_model)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and time.monotonic() - began < 20
    assert re.fullmatch(r"lmesh: lmesh-\w+ exited with status 2: OTEL_TRACES_EXPORTER='zipkin': lmesh exports "
                        r"traces with otlp, console, none \(not zipkin\) \(log: .*/logs/\w+\.log\)\n",
                        result.stderr), result.stderr
    assert not consul_answers(env["CONSUL_HTTP_ADDR"])  # the agent it started is stopped too


@pytest.mark.parametrize("command", [("chat", "hi"), ("models", "list"), ("keys", "list"), ("policy", "rules", "show")])
def test_operator_commands_without_consul_fail_at_once_in_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**os.environ, "CONSUL_HTTP_ADDR": nobody, "LMESH_HOME": str(tmp_path), "LMESH_API_KEY": "lmk_x"}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "services.cli", *command], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and time.monotonic() - began < 10
    assert result.stderr == (f"lmesh: no Consul agent answers at {nobody} (CONSUL_HTTP_ADDR): is the mesh running? "
                             "(`make run`)\n")


def test_dev_mesh_says_when_the_gateway_port_is_taken(built_model: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_dev_cli(built_model, tmp_path, port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"lmesh: port {port} is in use; stop what listens there or set LMESH_GATEWAY_PORT"


async def test_cli_errors_are_one_line_with_what_to_do(live: LiveMesh) -> None:
    unknown = await run_cli(live, "chat", "--key", live.api_key, "--model", "no-such-model", "hi")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0 and "NOT_FOUND" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    no_key = await run_cli(live, "chat", "hi")
    assert no_key.returncode == 2 and no_key.stderr == (
        "lmesh: no API key: pass --key, set LMESH_API_KEY, or run `make run` to create a dev key; or pass "
        "--client-cert and --client-key of a certificate bound to a key\n")



async def test_concurrent_chats_are_batched_without_changing_answers(live: LiveMesh) -> None:
    alone = "".join(r.delta for r in await collect(await live.gateway(), start(max_tokens=32), live.api_key))
    others = [start("Name three colors.", max_tokens=32), start(LONG_TASK, max_tokens=32)]
    requests = [start(max_tokens=32) for _ in range(6)] + others
    stub = await live.gateway()
    results = await asyncio.gather(*(collect(stub, r, live.api_key) for r in requests))
    answers = ["".join(r.delta for r in responses) for responses in results]
    assert answers[:6] == [alone] * 6
    assert all(responses[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED for responses in results)

async def test_a_service_that_logs_serving_is_already_passing_in_consul(live: LiveMesh) -> None:
    """Operators (and scripts) take "serving" in the log as ready: by then Consul must list it as passing."""
    import re
    import urllib.request

    entry = live.procs.start("tokenizer", name="tokenizer-2")  # stateless: a second one changes no answer
    try:
        while "lmesh-tokenizer serving" not in live.procs.log("tokenizer-2"):
            assert entry.process.poll() is None, live.procs.log("tokenizer-2")
            await asyncio.sleep(0.05)
        port = re.search(r"listening on [\d.]+:(\d+)", live.procs.log("tokenizer-2")).group(1)  # type: ignore[union-attr]
        url = f"http://{live.procs.consul_addr}/v1/health/service/lmesh-tokenizer?passing=true"
        passing = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=5)))
        assert port in {str(node["Service"]["Port"]) for node in passing}
    finally:
        live.procs.terminate("tokenizer-2")
        await live.procs.wait_exit("tokenizer-2")


async def test_every_services_status_message_stays_under_a_c_core_clients_trailer_limit(live: LiveMesh) -> None:
    """Echoed in a status message and percent-encoded, 2,000 emoji made a trailer over the 8 KiB a C-core client
    (this one) accepts: it saw RESOURCE_EXHAUSTED instead of the real code. Checked at every service."""
    from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc
    from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc
    from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    from services.common.rpc import MAX_STATUS_MESSAGE_BYTES, encoded_message_size

    emoji = "😀" * 2000

    async def stub_of(service: str, stub_class: type) -> object:
        return (await live.mesh.resolver(f"lmesh-{service}").pick()).stub(stub_class)

    async def generate() -> None:
        stub = await stub_of("inference", inference_pb2_grpc.InferenceStub)
        call = stub.Generate(timeout=10)  # type: ignore[attr-defined]
        await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
            model=emoji, prompt_token_ids=[1], max_tokens=1)))
        await call.done_writing()
        async for _ in call:
            pass

    async def chat(**fields: object) -> None:
        await collect(await live.gateway(), start(**fields), live.api_key)

    registry = await stub_of("registry", registry_pb2_grpc.RegistryStub)
    tokenizer = await stub_of("tokenizer", tokenizer_pb2_grpc.TokenizerStub)
    policy = await stub_of("policy", policy_pb2_grpc.PolicyStub)
    calls = {
        "gateway (role)": (chat(messages=[gateway_pb2.Message(role=emoji, content="hi")]),
                           grpc.StatusCode.INVALID_ARGUMENT),
        "gateway (model)": (chat(model=emoji), grpc.StatusCode.INVALID_ARGUMENT),
        "registry": (registry.ResolveModel(registry_pb2.ResolveModelRequest(reference=emoji), timeout=10),
                     grpc.StatusCode.INVALID_ARGUMENT),
        "tokenizer": (tokenizer.Encode(tokenizer_pb2.EncodeRequest(model=emoji, text="hi"), timeout=10),
                      grpc.StatusCode.INVALID_ARGUMENT),
        "policy": (policy.CreateApiKey(policy_pb2.CreateApiKeyRequest(tenant=emoji), timeout=10),
                   grpc.StatusCode.INVALID_ARGUMENT),
        "inference": (generate(), grpc.StatusCode.NOT_FOUND),
    }
    for where, (call, code) in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        details = caught.value.details() or ""
        assert caught.value.code() == code, (where, caught.value.code(), details[:200])
        assert encoded_message_size(details) <= MAX_STATUS_MESSAGE_BYTES, where


async def test_a_huge_model_reference_stays_out_of_the_chats_span(live: LiveMesh) -> None:
    model = "m" * 200_000
    error = await expect_error(await live.gateway(), [start(model=model, max_tokens=31)], auth(live.api_key))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    def refused(spans: list) -> list:  # type: ignore[type-arg]
        return [s for s in spans if s.name == "lmesh.gateway/Chat" and s.status_code == "ERROR"
                and "model:" in s.status_message and "more characters" in s.status_message]

    await live.otlp.wait_for(refused, timeout=20)
    chat = refused(live.otlp.spans)[-1]
    assert "gen_ai.request.model" not in chat.attributes
    assert all(len(str(value)) <= 1024 for value in chat.attributes.values())


async def test_no_chat_fails_while_the_consul_agent_restarts(live: LiveMesh, consul_agent: ConsulAgent) -> None:
    """A restarted dev agent answers with empty service lists until every service has registered again and
    passed a check (about two seconds): callers keep the instances they know instead of failing those chats."""
    stub = await live.gateway()
    results: list[str] = []

    async def chat_every_half_second(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                answer = await collect(stub, start(max_tokens=2), live.api_key, timeout=30)
                results.append("ok" if answer[-1].finish_reason else "no finish")
            except grpc.aio.AioRpcError as exc:
                results.append(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.5)

    stop = asyncio.Event()
    chats = asyncio.create_task(chat_every_half_second(stop))
    await asyncio.sleep(1.5)
    await asyncio.to_thread(consul_agent.restart)
    # A dev agent keeps no state: a new CA (which the services move to, trusting the former for a while) and no
    # intentions, applied again as `lmesh dev` applies them; decisions made meanwhile stand.
    await apply_intentions(consul_agent.http_addr)
    try:
        for service in SERVICES:  # every service registers again and passes
            await live.procs.wait_passing(live.mesh, service, timeout=30,
                                          model="smollm2-135m-instruct:1" if service == "inference" else "")
        await asyncio.sleep(2)
    finally:
        stop.set()
        await chats
    assert len(results) >= 6 and results == ["ok"] * len(results), results


# ---- zero trust: the internal services answer the mesh only ---------------------------------------------------

INTERNAL = ("registry", "policy", "tokenizer", "inference")


async def _one_call(channel: grpc.aio.Channel, service: str) -> object:
    """A call that would do real work at `service` (for inference: a generation)."""
    from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc
    from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc
    from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    if service == "registry":
        return await registry_pb2_grpc.RegistryStub(channel).ListModels(registry_pb2.ListModelsRequest(), timeout=5)
    if service == "policy":
        return await policy_pb2_grpc.PolicyStub(channel).CreateApiKey(
            policy_pb2.CreateApiKeyRequest(tenant="intruder"), timeout=5)
    if service == "tokenizer":
        return await tokenizer_pb2_grpc.TokenizerStub(channel).Encode(
            tokenizer_pb2.EncodeRequest(model="default", text="hi"), timeout=5)
    stub = inference_pb2_grpc.InferenceStub(channel)
    call = await write_first(stub.Generate(timeout=5), inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
        model="smollm2-135m-instruct:1", prompt_token_ids=[1, 2, 3], max_tokens=8)), lambda: stub.Generate(timeout=5))
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.done_writing()  # a call the server already ended: reading it says why
    return [message async for message in call]  # any message at all would be a generated token


async def _refused(channel: grpc.aio.Channel, service: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _one_call(channel, service)
    return caught.value.code()


async def test_internal_services_answer_no_caller_without_a_mesh_certificate(live: LiveMesh, tmp_path: Path
                                                                               ) -> None:
    """Without mTLS anyone who reached a port could generate without a key, mint keys or move aliases. Now: no
    certificate, a self-signed one, or one from another Consul CA gets no answer at the handshake; the health
    port (no client certificate, for Consul's check) refuses everything but health; a mesh identity that
    intentions do not allow is refused. The gateway's path works all along."""
    from tests.test_connect import self_signed

    assert live.mesh.security is not None
    mesh_identity = live.mesh.security.identity
    roots = mesh_identity.material.roots_pem
    fake_key, fake_cert = self_signed(tmp_path, "lmeshgateway", mesh_identity.spiffe_id)
    other_ca = ConsulAgent.start(log_path=tmp_path / "other-consul.log")
    try:
        foreign = await open_mesh(other_ca.http_addr, "lmesh-gateway", mtls=True)
        assert foreign.security is not None
        foreign_material = foreign.security.identity.material
        await foreign.close()
    finally:
        other_ca.stop()
    intruder = await open_mesh(live.procs.consul_addr, "lmesh-intruder", mtls=True)
    assert intruder.security is not None
    try:
        for service in INTERNAL:
            endpoint = live.mesh.resolver(f"lmesh-{service}").endpoints()[0]
            name = [("grpc.ssl_target_name_override", mesh_identity.server_name_for(f"lmesh-{service}"))]
            refused_at_handshake = {
                "plaintext": grpc.aio.insecure_channel(endpoint.target),
                "no certificate": grpc.aio.secure_channel(endpoint.target, grpc.ssl_channel_credentials(roots),
                                                          options=name),
                "self-signed": grpc.aio.secure_channel(
                    endpoint.target, grpc.ssl_channel_credentials(roots, fake_key, fake_cert), options=name),
                "another CA": grpc.aio.secure_channel(endpoint.target, grpc.ssl_channel_credentials(
                    roots, foreign_material.key_pem, foreign_material.cert_pem), options=name),
            }
            for kind, channel in refused_at_handshake.items():
                async with channel:
                    assert await _refused(channel, service) == grpc.StatusCode.UNAVAILABLE, (service, kind)
            health_target = f"{endpoint.address}:{endpoint.meta['health_port']}"
            async with grpc.aio.secure_channel(health_target, grpc.ssl_channel_credentials(roots),
                                               options=name) as channel:
                assert await _refused(channel, service) == grpc.StatusCode.UNAUTHENTICATED, service
            async with intruder.security.identity.secure_channel(endpoint.target, f"lmesh-{service}") as channel:
                assert await _refused(channel, service) == grpc.StatusCode.PERMISSION_DENIED, service
    finally:
        await intruder.close()
    answer = await collect(await live.gateway(), start(max_tokens=16), live.api_key)
    assert "Paris" in "".join(r.delta for r in answer)


async def _chat_outcome(live: LiveMesh) -> grpc.aio.AioRpcError | None:
    try:
        await collect(await live.gateway(), start(max_tokens=4), live.api_key)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def test_an_intention_denying_a_hop_fails_chats_naming_it_until_removed(live: LiveMesh) -> None:
    from services.common.connect import SETTLE_S, Intention

    # The replica follows intentions through a blocking query (milliseconds); a decision its local agent made a
    # moment behind the change is kept only until SETTLE_S has passed (IntentionAuthorizer). A loaded machine
    # gets 2 s more.
    settled_s = SETTLE_S + 2.0
    deny = Intention("lmesh-gateway", "lmesh-inference", "deny")
    await apply_intentions(live.procs.consul_addr, [deny])
    applied = time.monotonic()
    try:
        while (error := await _chat_outcome(live)) is None:
            assert time.monotonic() - applied < settled_s, "chats still pass after the intention was created"
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        details = error.details() or ""
        assert "lmesh-inference" in details and "lmesh-gateway" in details and "DENY" in details, details
        await asyncio.sleep(max(0.0, applied + SETTLE_S - time.monotonic()))  # no decision from before it stands
        assert await _chat_outcome(live) is not None, "a chat passed again while the intention denies the hop"
    finally:
        await apply_intentions(live.procs.consul_addr, [deny._replace(action="allow")])
    restored = time.monotonic()  # no restart: the next chats pass again
    while (error := await _chat_outcome(live)) is not None:
        assert time.monotonic() - restored < settled_s, error.details()


async def test_a_rotated_mesh_ca_is_picked_up_while_streams_run(live: LiveMesh, tmp_path: Path) -> None:
    """Consul re-issues every leaf when its CA rotates (a leaf TTL cannot go below an hour on 1.8.7, so a new root
    stands in for a short TTL), each within 30 s: services renew credentials without restarting, new calls use
    them, and streams opened before run on undisturbed."""
    from tests.test_connect import self_signed

    assert live.mesh.security is not None
    identity = live.mesh.security.identity
    stub = await live.gateway()
    streams = []
    for _ in range(2):
        call = stub.Chat(metadata=auth(live.api_key), timeout=240)
        await call.write(start(LONG_TASK, max_tokens=4000))
        assert (await call.read()).delta is not None
        streams.append(call)

    async def leaf(service: str, index: int = 0) -> tuple[int, str]:
        index, data = await live.mesh.consul.http.get(
            lambda response: (int(response.headers["X-Consul-Index"]), json.loads(response.body)),
            f"/v1/agent/connect/ca/leaf/{service}", params=[("index", str(index)), ("wait", "10s")])
        return index, data["CertPEM"]

    services = [f"lmesh-{s}" for s in (*INTERNAL, "gateway")]
    before = {service: await leaf(service) for service in services}
    root_key, root_cert = self_signed(tmp_path, "lmesh-e2e-root", f"spiffe://{identity.trust_domain}", ca=True)
    await live.mesh.consul.http.put(lambda response: response.body, "/v1/connect/ca/configuration", data=json.dumps(
        {"Provider": "consul", "Config": {"PrivateKey": root_key.decode(), "RootCert": root_cert.decode()}}))

    async def renewed(service: str) -> None:
        index, cert = before[service]
        while cert == before[service][1]:
            index, cert = await leaf(service, index)

    async with asyncio.timeout(60):
        await asyncio.gather(*(renewed(service) for service in services))
    await asyncio.sleep(1)  # the services' own watches hold the same leaves as the agent's cache
    answer = await collect(await live.gateway(), start(max_tokens=16), live.api_key)  # new handshakes inside
    assert "Paris" in "".join(r.delta for r in answer)
    for call in streams:
        assert (await call.read()).delta is not None  # still streaming
        await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
        rest = await read_rest(call)
        assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_CANCELLED


async def test_lmesh_health_probes_a_health_port_over_the_mesh_tls_and_the_public_port(live: LiveMesh) -> None:
    """Kubernetes' gRPC probe speaks no TLS: `lmesh health` is the probe for a service's TLS health port."""
    registry = live.mesh.resolver("lmesh-registry").endpoints()[0]
    served = await run_cli(live, "health", f"{registry.address}:{registry.meta['health_port']}",
                           "--mesh", "lmesh-registry")
    assert (served.returncode, served.stdout.strip()) == (0, "SERVING"), served.stderr
    gateway = (await live.mesh.resolver("lmesh-gateway").pick()).target
    assert (await run_cli(live, "health", gateway)).stdout.strip() == "SERVING"
    wrong = await run_cli(live, "health", f"{registry.address}:{registry.meta['health_port']}",
                          "--mesh", "lmesh-policy")  # another service's certificate name: not verified
    assert wrong.returncode != 0 and wrong.stderr.startswith("lmesh: UNAVAILABLE") and "Traceback" not in wrong.stderr


async def test_lmesh_intentions_shows_and_applies_what_the_mesh_needs(live: LiveMesh) -> None:
    from services.common.connect import Intention, default_intentions

    shown = await run_cli(live, "intentions")
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) == 1 + len(default_intentions())
    flipped = Intention("lmesh-tokenizer", "lmesh-registry", "deny")
    await apply_intentions(live.procs.consul_addr, [flipped])
    try:
        differs = await run_cli(live, "intentions")
        rows = [line.split() for line in differs.stdout.splitlines()]
        assert differs.returncode == 1 and ["lmesh-tokenizer", "lmesh-registry", "allow", "deny"] in rows
        assert differs.stderr.strip() == "1 missing or different: `lmesh intentions apply` makes Consul hold them"
    finally:
        applied = await run_cli(live, "intentions", "apply")
    assert applied.returncode == 0 and "allow   allow (updated)" in applied.stdout, applied.stdout


def test_no_call_between_services_is_made_outside_the_client_runtime() -> None:
    """Every channel and stub of the mesh's own calls comes from services/common/peers.py (through the resolvers
    of discovery.py and the credentials of connect.py): no second way to call a peer, without its identity."""
    import ast

    runtime = {ROOT / "services/common/peers.py", ROOT / "services/common/discovery.py",
               ROOT / "services/common/connect.py"}
    offenders = []
    for path in sorted([*(ROOT / "services").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        if path in runtime:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name.endswith("Stub") or name in ("insecure_channel", "secure_channel"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(...)")
    assert not offenders, offenders


async def test_no_service_logged_a_traceback(live: LiveMesh) -> None:
    """Runs last: after everything above (bad input, cancels, kills, drains), no service logged a bug."""
    for name in live.procs.processes:
        # The OpenTelemetry SDK logs an ERROR when the test's collector answers too slowly (a loaded machine):
        # the collector's, not a service's, problem.
        log = "\n".join(line for line in live.procs.log(name).splitlines()
                        if not ("opentelemetry.exporter" in line and "DEADLINE_EXCEEDED" in line))
        assert "Traceback" not in log and " ERROR " not in log, f"{name}:\n{log[-3000:]}"


async def test_guardrails_block_redact_and_refuse_through_the_gateway(live: LiveMesh) -> None:
    stub = await live.gateway()
    plain = "".join(r.delta for r in await collect(stub, start(max_tokens=64), live.api_key))
    assert "Paris" in plain and "France" in plain
    guarded = (await create_key(live.mesh.peer(POLICY), "guarded")).api_key
    redacted = (await create_key(live.mesh.peer(POLICY), "redacted")).api_key

    # A block rule on the answer: it ends before the match, CONTENT_FILTER, with the tokens used; nothing of it sent.
    responses = await collect(stub, start(max_tokens=64, logprobs=True), guarded)
    text = "".join(r.delta for r in responses)
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    assert plain[:plain.index("Paris")].startswith(text) and "P" not in text[len("The capital of France is "):]
    assert responses[-1].usage.completion_tokens > 0
    entries = b"".join(e.bytes for r in responses for e in r.logprobs)
    assert text.encode().startswith(entries) and b"Paris" not in entries

    # A redact rule: the match replaced, every other byte as without rules; its token's logprob entry scrubbed.
    responses = await collect(stub, start(max_tokens=64, logprobs=True), redacted)
    text = "".join(r.delta for r in responses)
    assert text == plain.replace("France", "[REDACTED:e2e-france]")
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    entries = [e for r in responses for e in r.logprobs]
    assert len(entries) == responses[-1].usage.completion_tokens
    assert any(e.token_id == -1 and not e.bytes for e in entries)
    assert b"France" not in b"".join(e.bytes for e in entries)

    # A block rule on the input: refused before generation, naming the rule and the message, never the text.
    error = await expect_error(stub, [start("Say open  SESAME, then the capital of France.")], auth(guarded))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    info = typed_details(error)["ErrorInfo"]
    assert info.reason == "CONTENT_BLOCKED" and dict(info.metadata) == {"rule_id": "e2e-password",
                                                                         "field": "messages[0].content"}
    assert "sesame" not in (error.details() or "").lower()
    # The default rules on the input: an e-mail address in a message is redacted before the model sees it.
    mailed = await collect(stub, start("Repeat exactly: jane.doe@example.com", max_tokens=24), guarded)
    assert "jane.doe" not in "".join(r.delta for r in mailed)


async def test_a_rules_edit_during_open_streams_takes_effect_for_new_requests_and_breaks_none(live: LiveMesh) -> None:
    stub = await live.gateway()
    edited = (await create_key(live.mesh.peer(POLICY), "edited")).api_key
    calls = []
    for _ in range(3):
        call = stub.Chat(metadata=auth(edited), timeout=120)
        await call.write(start(LONG_TASK, max_tokens=96))
        await call.done_writing()
        first = await call.read()
        assert first is not grpc.aio.EOF and first.delta
        calls.append((call, [first]))
    write_e2e_rules(live.procs.home, """
  - id: e2e-edited
    detect: deny
    action: block
    phrases: [paris]
    applies_to: [output]
    tenants: [edited]
""")
    try:
        for _ in range(60):
            responses = await collect(stub, start(max_tokens=64), edited)
            if responses[-1].finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER:
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError("the edited rules never took effect")
        assert "Paris" not in "".join(r.delta for r in responses)
        for call, seen in calls:  # the open streams run on to their end, with the rules they started with
            seen += await read_rest(call)
            assert seen[-1].finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
            assert await call.code() == grpc.StatusCode.OK
            assert seen[-1].usage.completion_tokens > 1
    finally:
        write_e2e_rules(live.procs.home)


# ---- model lifecycle: the module's last tests, for they move `default` (and leave it where they found it) ------

V1 = "smollm2-135m-instruct:1"


async def _wait_until(condition: Any, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def runs_of(answered: list[str]) -> list[tuple[str, int]]:
    """Consecutive answers from one version, as (version, count)."""
    runs: list[tuple[str, int]] = []
    for version in answered:
        if runs and runs[-1][0] == version:
            runs[-1] = (version, runs[-1][1] + 1)
        else:
            runs.append((version, 1))
    return runs


async def _follower_meta(live: LiveMesh) -> dict[str, str]:
    """The Consul meta of the replica that follows `default` (the module's main one)."""
    endpoints = await live.mesh.resolver("lmesh-inference").passing()
    followers = [e for e in endpoints if e.meta.get("follows") == "default"]
    assert len(followers) == 1, [e.meta for e in endpoints]
    return dict(followers[0].meta)


async def test_a_rollout_and_its_rollback_under_sixteen_streams_fail_no_request(live: LiveMesh) -> None:
    """`default` moves from version 1 to the int8 build and back while 16 streams run: every answer completes,
    and the answers' `model` shows the replica's switch. The replica re-verifies the int8 weights it takes from
    its artifact cache: a corrupted copy there is detected and fetched again."""
    if "inference-int8" not in live.procs.processes:
        pytest.skip("no int8 build (make model builds it)")
    from lmesh.registry.v1 import registry_pb2

    from services.registry.client import set_alias

    # The pinned int8 replica (tiny admission bounds) would take the canary's share: the follower alone serves.
    live.procs.terminate("inference-int8")
    await live.procs.wait_exit("inference-int8")
    registry = live.mesh.peer(REGISTRY)
    int8 = (await registry.call(lambda r: r.GetModel, registry_pb2.GetModelRequest(
        name="smollm2-135m-instruct", version="1-int8"))).model
    weights = next(a for a in int8.artifacts if a.kind == registry_pb2.ARTIFACT_KIND_MODEL)
    cached = lmesh_cache() / "artifacts" / weights.sha256
    if cached.exists():  # replaced, not written in place: a process that mapped the file keeps its bytes
        corrupt = cached.with_name(cached.name + ".corrupt")
        corrupt.write_bytes(b"not the weights")
        os.replace(corrupt, cached)

    stub = await live.gateway()
    stop = asyncio.Event()
    answered: list[str] = []
    failures: list[str] = []

    async def stream(i: int) -> None:
        turn = 0
        while not stop.is_set():
            turn += 1
            try:
                responses = await collect(stub, start(f"Count from {i} to {i + turn}.", max_tokens=12),
                                          live.api_key, timeout=180)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            end = responses[-1]
            if end.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED or end.usage.completion_tokens < 1:
                failures.append(f"incomplete answer: {end}")
            answered.append(end.model)

    def last_answers_from(version: str) -> bool:
        return len(answered) >= 32 and set(answered[-16:]) == {version}

    streams = [asyncio.create_task(stream(i)) for i in range(16)]
    try:
        await _wait_until(lambda: last_answers_from(V1), "the streams to run on version 1")
        await set_alias(registry, "default", "smollm2-135m-instruct", "1-int8")
        await _wait_until(lambda: last_answers_from(INT8), "the switch to the int8 version")
        switched_at = len(answered)
        await set_alias(registry, "default", "smollm2-135m-instruct", "1")
        await _wait_until(lambda: len(answered) > switched_at + 16 and last_answers_from(V1), "the switch back")
    finally:
        stop.set()
        await asyncio.gather(*streams)
        await set_alias(registry, "default", "smollm2-135m-instruct", "1")
    print(f"\nrollout: {len(answered)} answers, {len(failures)} failed; by version in order of completion: "
          f"{runs_of(answered)}")
    assert failures == []
    assert len(answered) > 64
    # Version 1, then the int8 version, then version 1 again (answers of a switch's moment may end out of order).
    runs = [version for i, version in enumerate(answered) if i == 0 or answered[i - 1] != version]
    assert runs[0] == V1 and runs[-1] == V1 and INT8 in runs
    log = live.procs.log("inference")
    assert "corrupted" in log and weights.sha256[:12] in log
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == weights.sha256  # fetched again, whole
    # Version 1 serves alone again; the int8 copy was drained and freed.
    await live.mesh.resolver("lmesh-inference").wait_for(
        lambda e: e.meta.get("follows") == "default" and e.models == [V1] and not e.meta.get("draining"), timeout=60)
    assert (await _follower_meta(live)).get("loading", "") == ""


async def test_a_canary_split_takes_its_share_and_a_rollback_ends_it_at_once(live: LiveMesh) -> None:
    """`default` split 90/10 between version 1 and the int8 build: 200 chats send 10% ± 7 points (3.3 standard
    deviations) to the canary; `rollback` restores version 1 alone for the very next chats. A version in use cannot
    be deleted."""
    from lmesh.registry.v1 import registry_pb2

    from services.common.rpc import error_reason

    registry = live.mesh.peer(REGISTRY)
    listed = await registry.call(lambda r: r.ListModels, registry_pb2.ListModelsRequest(name="smollm2-135m-instruct"))
    if INT8 not in {f"{m.name}:{m.version}" for m in listed.models}:
        pytest.skip("no int8 build (make model builds it)")
    await registry.call(lambda r: r.SetAlias, registry_pb2.SetAliasRequest(alias="default", actor="e2e", targets=[
        registry_pb2.AliasTarget(name="smollm2-135m-instruct", version="1", weight=90),
        registry_pb2.AliasTarget(name="smollm2-135m-instruct", version="1-int8", weight=10)]), retry=False)
    try:
        # The follower loads the canary beside version 1; the split's share goes to version 1 until it is warm.
        await live.mesh.resolver("lmesh-inference").wait_for(
            lambda e: e.meta.get("follows") == "default" and {V1, INT8} <= set(e.models), timeout=180)
        stub = await live.gateway()
        chats = asyncio.Semaphore(16)

        async def one(i: int) -> str:
            async with chats:
                responses = await collect(stub, start(f"Say {i}.", max_tokens=1), live.api_key, timeout=120)
                return responses[-1].model

        models = Counter(await asyncio.gather(*(one(i) for i in range(200))))
        print(f"\ncanary split 90/10: {dict(models)}")
        assert set(models) == {V1, INT8}
        assert abs(models[INT8] / 200 - 0.10) <= 0.07, models

        # In use: refused, naming the alias.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await registry.call(lambda r: r.DeleteModel, registry_pb2.DeleteModelRequest(
                name="smollm2-135m-instruct", version="1-int8"), retry=False)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(refused.value) == "MODEL_IN_USE" and "default" in (refused.value.details() or "")

        rolled = await registry.call(lambda r: r.RollbackAlias,
                                     registry_pb2.RollbackAliasRequest(alias="default", actor="e2e"), retry=False)
        assert [(t.version, t.weight) for t in rolled.alias.targets] == [("1", 100)]
        after = Counter(await asyncio.gather(*(one(i) for i in range(24))))
        assert after == Counter({V1: 24})
    finally:
        await registry.call(lambda r: r.SetAlias, registry_pb2.SetAliasRequest(
            alias="default", name="smollm2-135m-instruct", version="1", actor="e2e"), retry=False)

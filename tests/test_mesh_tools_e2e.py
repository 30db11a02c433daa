"""The LLM as a gateway to the mesh's services, end to end: a real Consul agent, every lmesh service as a process
(lmesh-tools and lmesh-embeddings among them), the real model, and a tool provider of the test's own that is slow
or broken on purpose. Also structured outputs and client-side function calling through the public APIs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import jsonschema
import numpy as np
import openai
import pytest
import pytest_asyncio
from lmesh.common.v1 import generation_pb2
from lmesh.embeddings.v1 import embeddings_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from lmesh.policy.v1 import policy_pb2
from lmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from opentelemetry import trace

from services.common.config import ServiceConfig
from services.common.connect import Intention, apply_intentions
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.errors import Reason
from services.common.peers import EMBEDDINGS, POLICY, REGISTRY, open_mesh
from services.common.rpc import error_reason
from services.common.server import RunningService, ServiceParts, ServiceRuntime, start_service
from services.gateway.tool_catalog import ToolCatalog
from services.gateway.tool_graph import GraphOutcome, parse_plan, run_graph
from services.gateway.tool_retrieval import ToolIndex, embeddings_of
from services.policy.client import create_key
from services.registry.client import register_model_dir
from services.tools.catalog import TOOL_TAG, ToolEntry, format_tool_meta
from tests.harness import MeshProcesses
from tests.otlp import OtlpReceiver

SERVICES = ("registry", "policy", "tokenizer", "inference", "gateway", "tools", "embeddings")
State = gateway_pb2.ToolStep


class SlowOrBrokenText(tools_pb2_grpc.TextServicer):
    """A team's tool provider that misbehaves: CountText never answers in time, ChangeCase fails."""

    async def CountText(self, request: tools_pb2.CountTextRequest, context: grpc.aio.ServicerContext,
                        ) -> tools_pb2.CountTextResponse:
        await asyncio.sleep(30)
        return tools_pb2.CountTextResponse()

    async def ChangeCase(self, request: tools_pb2.ChangeCaseRequest, context: grpc.aio.ServicerContext,
                         ) -> tools_pb2.ChangeCaseResponse:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the case service's database is down")
        raise AssertionError("unreachable")


TEAM_TOOLS = (
    ToolEntry("slow_word_count", "lmesh.tools.v1.Text/CountText",
              "Counts the words of a text for the editorial team's style checker."),
    ToolEntry("broken_case", "lmesh.tools.v1.Text/ChangeCase",
              "Changes the letter case of a text for the editorial team's headline tool."),
)


async def start_team_provider(tool_mesh: ToolMesh, data_dir: Path) -> RunningService:
    """The team's provider, which lmesh denies calls to by default: an intention lets the gateway call it."""
    service = f"team-{uuid.uuid4().hex[:6]}"
    await apply_intentions(tool_mesh.consul_addr, [Intention("lmesh-gateway", f"lmesh-{service}", "allow")])
    return await start_service(ServiceConfig(mtls=True, service=service, consul_addr=tool_mesh.consul_addr,
                                             grace_s=0, data_dir=data_dir), team_provider)


def team_provider(runtime: ServiceRuntime) -> ServiceParts:
    full_name = tools_pb2.DESCRIPTOR.services_by_name["Text"].full_name
    return ServiceParts(servicers=[(tools_pb2_grpc.add_TextServicer_to_server, SlowOrBrokenText(), full_name)],
                        tags=(TOOL_TAG,), meta=lambda: format_tool_meta(TEAM_TOOLS))


@dataclass
class ToolMesh:
    procs: MeshProcesses
    mesh: Mesh
    consul_addr: str
    all_tools: str  # an API key granted every tool
    calculator_only: str
    no_tools: str
    gateway_target: str
    http_base: str
    otlp: OtlpReceiver | None = None

    def gateway(self, channel: grpc.aio.Channel) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(channel)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def tool_mesh(consul_agent: ConsulAgent, built_model: Path, tmp_path_factory: pytest.TempPathFactory,
                    ) -> AsyncIterator[ToolMesh]:
    otlp = OtlpReceiver()
    procs = MeshProcesses(consul_agent.http_addr, tmp_path_factory.mktemp("tool-mesh"), await otlp.start())
    await apply_intentions(consul_agent.http_addr)
    mesh = await open_mesh(consul_agent.http_addr, "lmesh-gateway", mtls=True)
    try:
        for service in SERVICES:
            procs.start(service)
        await procs.wait_passing(mesh, "registry")
        await register_model_dir(mesh.peer(REGISTRY), built_model, aliases=("default",))
        await procs.wait_passing(mesh, "policy")
        keys = [(await create_key(mesh.peer(POLICY), "tools-e2e", allowed_tools=grant)).api_key
                for grant in (["*"], ["calculator"], [])]
        for service in SERVICES:
            await procs.wait_passing(mesh, service, model="smollm2-135m-instruct:1" if service == "inference" else "")
        gateway = await mesh.resolver("lmesh-gateway").wait_for()
        yield ToolMesh(procs, mesh, consul_agent.http_addr, *keys, gateway.target,
                       f"http://127.0.0.1:{gateway.meta['http_port']}", otlp)
    finally:
        await mesh.close()
        await procs.stop_all()
        await otlp.stop()


async def chat(tool_mesh: ToolMesh, key: str, start: gateway_pb2.ChatStart, timeout: float = 120,
               ) -> list[gateway_pb2.ChatResponse]:
    async with grpc.aio.insecure_channel(tool_mesh.gateway_target) as channel:
        call = tool_mesh.gateway(channel).Chat(iter([gateway_pb2.ChatRequest(start=start)]),
                                               metadata=[("authorization", f"Bearer {key}")], timeout=timeout)
        return [response async for response in call]


def ask(question: str, max_tokens: int = 48, **fields: Any) -> gateway_pb2.ChatStart:
    return gateway_pb2.ChatStart(messages=[gateway_pb2.Message(role="user", content=question)],
                                 max_tokens=max_tokens, **fields)


def steps(responses: list[gateway_pb2.ChatResponse]) -> list[gateway_pb2.ToolStep]:
    return [r.tool_step for r in responses if r.HasField("tool_step")]


async def test_a_named_tool_is_called_with_arguments_valid_against_its_reflected_schema(tool_mesh: ToolMesh) -> None:
    responses = await chat(tool_mesh, tool_mesh.all_tools, ask("What is 17 * 23?", tools=gateway_pb2.ToolUse(
        names=["calculator"])))
    taken = steps(responses)
    assert [(s.call, s.tool, s.state) for s in taken] == [(1, "calculator", State.STATE_STARTED),
                                                          (1, "calculator", State.STATE_SUCCEEDED)]
    catalog = ToolCatalog(tool_mesh.mesh)
    try:
        tool = (await catalog.tools())["calculator"]
        schema = (await catalog.method(tool)).parameters
    finally:
        await catalog.close()
    jsonschema.validate(json.loads(taken[0].arguments_json), schema)
    assert json.loads(taken[1].result_json)["value"] == "391"
    assert taken[1].latency_ms >= 0
    last = responses[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert responses[0].model == last.model and responses[0].id == last.id  # the first message is a step
    assert "391" in "".join(r.delta for r in responses)
    # The plan's tokens are in the usage: more than the answer alone.
    assert last.usage.prompt_tokens > 200
    # The call is a span of the chat's trace, under the plan's and the chat's.
    assert tool_mesh.otlp is not None
    def chat_trace(spans: list[Any]) -> list[Any]:
        root = [s for s in spans if s.attributes.get("gen_ai.response.id") == last.id and s.service == "lmesh-gateway"]
        return [s for s in spans if root and s.trace_id == root[0].trace_id]

    spans = chat_trace(await tool_mesh.otlp.wait_for(lambda spans: {
        "execute_tool calculator", "plan_tools"} <= {s.name for s in chat_trace(spans)} and any(
        s.service == "lmesh-tools" for s in chat_trace(spans)), timeout=30))
    call = next(s for s in spans if s.name == "execute_tool calculator")
    assert call.attributes["gen_ai.tool.name"] == "calculator" and call.attributes["gen_ai.tool.call.id"] == "call_1"
    assert any(s.parent_span_id == call.span_id and s.service == "lmesh-tools" for s in spans)  # the tool's own


async def test_retrieval_finds_a_tool_registered_in_consul_and_forgets_it_when_it_leaves(tool_mesh: ToolMesh,
                                                                                        tmp_path: Path) -> None:
    catalog = ToolCatalog(tool_mesh.mesh)
    index = ToolIndex(embeddings_of(tool_mesh.mesh.peer(EMBEDDINGS)))
    team = await start_team_provider(tool_mesh, tmp_path)
    try:
        deadline = time.monotonic() + 20
        while "slow_word_count" not in (tools := await catalog.tools()):
            assert time.monotonic() < deadline, "the new provider's tools never appeared"
            await asyncio.sleep(0.2)
        ranked = await index.rank("How many words are in this paragraph of my article?", list(tools.values()), 3)
        assert "slow_word_count" in [c.tool.name for c in ranked]
        ranked = await index.rank("What is 1234 times 5678?", list(tools.values()), 3)
        assert ranked[0].tool.name == "calculator"
    finally:
        await team.stop()
    deadline = time.monotonic() + 20
    while "slow_word_count" in (tools := await catalog.tools()):
        assert time.monotonic() < deadline, "a deregistered provider's tools stayed"
        await asyncio.sleep(0.2)
    ranked = await index.rank("How many words are in this paragraph of my article?", list(tools.values()), 3)
    assert "slow_word_count" not in [c.tool.name for c in ranked]
    await catalog.close()


async def test_a_two_step_graph_feeds_the_first_result_to_the_second_call(tool_mesh: ToolMesh) -> None:
    catalog = ToolCatalog(tool_mesh.mesh)
    tools = await catalog.tools()
    plan = {"calls": [{"tool": "city_distance", "arguments": {"from_city": "Paris", "to_city": "Berlin"}},
                      {"tool": "calculator", "arguments": {"expression": "$1.kilometers * 2"}},
                      {"tool": "convert_units", "arguments": {"value": "$2.value", "from_unit": "km",
                                                              "to_unit": "m"}}]}
    outcome = GraphOutcome()

    async def invoke(name: str, arguments: dict[str, Any]) -> Any:
        return await catalog.call(tools[name], arguments, 5.0)

    events = [event async for event in run_graph(parse_plan(plan), invoke, trace.get_tracer("test"), outcome)]
    await catalog.close()
    kilometers = outcome.finished[1].result["kilometers"]  # type: ignore[index]
    assert 870 < kilometers < 890
    assert outcome.finished[2].arguments == {"expression": f"{kilometers} * 2"}
    doubled = outcome.finished[2].result["value"]  # type: ignore[index]
    assert float(doubled) == pytest.approx(2 * kilometers)
    assert float(outcome.finished[3].result["value"]) == pytest.approx(2000 * kilometers)  # type: ignore[index]
    assert len(events) == 6


async def test_a_tool_that_times_out_or_fails_gives_a_clear_step_and_an_answer(tool_mesh: ToolMesh,
                                                                              tmp_path: Path) -> None:
    team = await start_team_provider(tool_mesh, tmp_path)
    catalog = ToolCatalog(tool_mesh.mesh)
    try:
        deadline = time.monotonic() + 20
        while "broken_case" not in await catalog.tools():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        started = time.monotonic()
        responses = await chat(tool_mesh, tool_mesh.all_tools, ask(
            "Count the words in: the quick brown fox", tools=gateway_pb2.ToolUse(names=["slow_word_count"],
                                                                                call_timeout_ms=500)), timeout=60)
        assert time.monotonic() - started < 30  # never the tool's 30 s
        ended = [s for s in steps(responses) if s.state != State.STATE_STARTED]
        assert ended and all(s.state == State.STATE_FAILED and s.error_code == "DEADLINE_EXCEEDED" for s in ended)
        assert responses[-1].finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)

        responses = await chat(tool_mesh, tool_mesh.all_tools, ask(
            "Make this upper case: hello", tools=gateway_pb2.ToolUse(names=["broken_case"])))
        ended = [s for s in steps(responses) if s.state != State.STATE_STARTED]
        assert ended and all(s.error_code == "UNAVAILABLE" and "database is down" in s.error_message for s in ended)
        assert responses[-1].HasField("usage")
    finally:
        await catalog.close()
        await team.stop()


async def test_a_key_without_the_grant_cannot_make_the_gateway_call_a_tool(tool_mesh: ToolMesh) -> None:
    for key, name in ((tool_mesh.no_tools, "calculator"), (tool_mesh.calculator_only, "convert_units")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat(tool_mesh, key, ask("What is 2 + 2?", tools=gateway_pb2.ToolUse(names=[name])))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(refused.value) == Reason.TOOL_NOT_ALLOWED
    # `auto` considers granted tools only: none for this key, so no call at all.
    responses = await chat(tool_mesh, tool_mesh.no_tools, ask("What is 17 * 23?", tools=gateway_pb2.ToolUse(
        auto=True)))
    assert steps(responses) == [] and responses[-1].finish_reason
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await chat(tool_mesh, tool_mesh.all_tools, ask("Hi", tools=gateway_pb2.ToolUse(names=["no_such_tool"])))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(unknown.value) == Reason.TOOL_NOT_FOUND


async def test_auto_chooses_the_tool_the_request_needs(tool_mesh: ToolMesh) -> None:
    responses = await chat(tool_mesh, tool_mesh.calculator_only, ask(
        "What is 123 * 456?", tools=gateway_pb2.ToolUse(auto=True)))
    assert [s.tool for s in steps(responses)][:1] == ["calculator"]


async def test_a_tool_chat_is_one_request_against_the_keys_rate_limit_and_streams_where_it_stands(
        tool_mesh: ToolMesh) -> None:
    """The plan's admission counts the chat; its answer continues it (no second request); both protocols send the
    rate-limit headers before the first tool step."""
    one_a_minute = policy_pb2.Limits(requests_per_minute=1)
    grpc_key, http_key = [(await create_key(tool_mesh.mesh.peer(POLICY), "tools-rpm", allowed_tools=["calculator"],
                                            limits=one_a_minute)).api_key for _ in range(2)]
    async with grpc.aio.insecure_channel(tool_mesh.gateway_target) as channel:
        call = tool_mesh.gateway(channel).Chat(
            iter([gateway_pb2.ChatRequest(start=ask("What is 17 * 23?", max_tokens=24,
                                                     tools=gateway_pb2.ToolUse(names=["calculator"])))]),
            metadata=[("authorization", f"Bearer {grpc_key}")], timeout=120)
        responses = [response async for response in call]
        initial = {k: v for k, v in (await call.initial_metadata() or ())}
    assert responses[0].HasField("tool_step") and steps(responses)[-1].state == State.STATE_SUCCEEDED
    assert responses[-1].finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
    assert initial["x-ratelimit-limit-requests"] == "1" and initial["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # the one request of the minute was the tool chat
        await chat(tool_mesh, grpc_key, ask("Hi", max_tokens=4))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == Reason.RATE_LIMITED and "1 requests per minute" in str(
        refused.value.details())

    body = {"model": "default", "messages": [{"role": "user", "content": "What is 17 * 23?"}], "max_tokens": 24,
            "stream": True, "mesh_tools": {"names": ["calculator"]}}
    async with httpx2.AsyncClient(timeout=120) as client, client.stream(
            "POST", f"{tool_mesh.http_base}/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {http_key}"}) as streamed:
        lines = [line async for line in streamed.aiter_lines() if line]
    assert streamed.status_code == 200, lines
    assert streamed.headers["x-ratelimit-limit-requests"] == "1"
    assert streamed.headers["x-ratelimit-remaining-requests"] == "0"
    assert streamed.headers["x-lmesh-cache"] == "bypass"
    assert "lmesh_tool_step" in lines[0] and lines[-1] == "data: [DONE]"
    assert not any(line.startswith("event: error") for line in lines), lines


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


async def test_structured_output_parses_against_its_schema_on_grpc_and_http(tool_mesh: ToolMesh) -> None:
    responses = await chat(tool_mesh, tool_mesh.no_tools, ask(
        "Invent a person.", max_tokens=64,
        response_format=generation_pb2.OutputConstraint(json_schema=json.dumps(PERSON))))
    assert responses[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads("".join(r.delta for r in responses)), PERSON)
    client = openai.AsyncOpenAI(base_url=f"{tool_mesh.http_base}/v1", api_key=tool_mesh.no_tools)
    answer = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Invent a person."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), PERSON)


UNCOMPILABLE = {"type": "object", "properties": 5}


async def test_a_constraint_the_replica_cannot_compile_is_refused_naming_the_field_sent(tool_mesh: ToolMesh) -> None:
    """The replica compiles constraints; its refusal names the caller's field, not the engine's `constraint`: the
    response_format, or with functions to call (whose schemas the gateway compiles into the constraint) the
    functions, over gRPC and with HTTP's own names."""
    function = gateway_pb2.FunctionDefinition(name="f", parameters_json=json.dumps(UNCOMPILABLE))
    valid = gateway_pb2.FunctionDefinition(name="f", parameters_json=json.dumps(WEATHER))
    bad_format = generation_pb2.OutputConstraint(json_schema=json.dumps(UNCOMPILABLE))
    for start, field in [(ask("x", response_format=bad_format), "response_format.json_schema"),
                         (ask("x", functions=[function], function_choice="required"), "functions"),
                         (ask("x", functions=[valid], response_format=bad_format), "response_format.json_schema")]:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await chat(tool_mesh, tool_mesh.no_tools, start)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (bad.value.details() or "").startswith(f"{field}: "), bad.value.details()
    client = openai.AsyncOpenAI(base_url=f"{tool_mesh.http_base}/v1", api_key=tool_mesh.no_tools, max_retries=0)
    user = [{"role": "user", "content": "x"}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "bad", "schema": UNCOMPILABLE}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": UNCOMPILABLE}}]
    for fields, param in [({"response_format": schema_format}, "response_format.json_schema.schema"),
                          ({"tools": tools, "tool_choice": "required"}, "tools")]:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="default", messages=user, max_tokens=8,  # type: ignore
                                                 **fields)
        assert (refused.value.code, refused.value.param) == ("invalid_value", param), refused.value.body


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                                                                              "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}


async def test_client_side_function_calls_come_back_as_tool_calls(tool_mesh: ToolMesh) -> None:
    start = ask("What's the weather in Oslo?", max_tokens=128, functions=[gateway_pb2.FunctionDefinition(
        name="get_weather", description="The current weather in a city.", parameters_json=json.dumps(WEATHER))],
        function_choice="required")
    responses = await chat(tool_mesh, tool_mesh.no_tools, start)
    last = responses[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_TOOL_CALLS
    assert "".join(r.delta for r in responses) == ""
    [call] = last.function_calls[:1]
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments_json), WEATHER)

    client = openai.AsyncOpenAI(base_url=f"{tool_mesh.http_base}/v1", api_key=tool_mesh.no_tools)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                               "parameters": WEATHER}}]
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Oslo?"}]
    answer = await client.chat.completions.create(model="default", messages=messages, tools=tools,  # type: ignore[arg-type]
                                                  tool_choice="required", max_tokens=128, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    called = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(called.function.arguments), WEATHER)  # type: ignore[union-attr]
    # The client runs it and sends the result back: the model answers in text.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": called.id, "content": '{"temperature": -3, "unit": "celsius"}'}]
    followed = await client.chat.completions.create(model="default", messages=messages, tools=tools,  # type: ignore[arg-type]
                                                    tool_choice="none", max_tokens=32, temperature=0)
    assert followed.choices[0].finish_reason in ("stop", "length") and followed.choices[0].message.content
    streamed = await client.chat.completions.create(model="default", messages=messages[:1], tools=tools,  # type: ignore[arg-type]
                                                    tool_choice="required", max_tokens=128, temperature=0, stream=True)
    chunks = [chunk async for chunk in streamed]
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert calls and calls[0].function and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Cut short by max_tokens: neither the half-written call nor text.
    cut = await chat(tool_mesh, tool_mesh.no_tools, ask("What's the weather in Oslo?", max_tokens=6, functions=[
        gateway_pb2.FunctionDefinition(name="get_weather", parameters_json=json.dumps(WEATHER))],
        function_choice="required"))
    assert cut[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH and not cut[-1].function_calls
    assert "".join(r.delta for r in cut) == ""
    short = await client.chat.completions.create(model="default", messages=messages[:1], tools=tools,  # type: ignore[arg-type]
                                                 tool_choice="required", max_tokens=6, temperature=0)
    assert short.choices[0].finish_reason == "length" and not short.choices[0].message.tool_calls
    assert not short.choices[0].message.content


async def test_clients_embed_through_the_gateway_on_grpc_and_http(tool_mesh: ToolMesh) -> None:
    async with grpc.aio.insecure_channel(tool_mesh.gateway_target) as channel:
        answer = await tool_mesh.gateway(channel).Embed(
            embeddings_pb2.EmbedRequest(inputs=["a cat sat on the mat", "a kitten rested on the rug", "tax law"]),
            metadata=[("authorization", f"Bearer {tool_mesh.no_tools}")], timeout=30)
        vectors = np.asarray([e.values for e in answer.embeddings])
        assert vectors.shape == (3, answer.dimensions) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
        assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tool_mesh.gateway(channel).Embed(embeddings_pb2.EmbedRequest(inputs=["x"]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = openai.AsyncOpenAI(base_url=f"{tool_mesh.http_base}/v1", api_key=tool_mesh.no_tools)
    http = await client.embeddings.create(model=answer.model, input=["a cat sat on the mat"])
    assert np.allclose(http.data[0].embedding, vectors[0], atol=1e-5)
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="text-embedding-3-small", input="x")


def test_the_cli_shows_each_tool_step_and_the_answer(tool_mesh: ToolMesh) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "chat", "--tools", "calculator", "--max-tokens", "32",
         "--gateway", tool_mesh.gateway_target, "--key", tool_mesh.all_tools, "What is 17 * 23?"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CONSUL_HTTP_ADDR": tool_mesh.consul_addr})
    assert done.returncode == 0, done.stderr
    assert "→  [1] calculator" in done.stderr and '"value": "391"' in done.stderr
    assert "391" in done.stdout and "calculator" not in done.stdout.splitlines()[0]


def test_the_cli_lists_the_mesh_tools(tool_mesh: ToolMesh) -> None:
    done = subprocess.run([sys.executable, "-m", "services.cli", "tools"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CONSUL_HTTP_ADDR": tool_mesh.consul_addr})
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in done.stdout.splitlines()[1:]}
    assert rows["calculator"] == ["lmesh-tools", "lmesh.tools.v1.Calculator/Evaluate"]
    assert {"convert_units", "city_distance", "search_people"} <= set(rows)

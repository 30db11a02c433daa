"""Routing through a real mesh (a real Consul, the services as processes, the real model): a session's turns stay on
one of two inference replicas and move to the other when theirs is killed; request priority, capped by the key,
orders a full queue (a high-priority chat sheds a queued low one; one over its key's cap is clipped and sheds
nothing); and the HTTP API's `priority` field."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, free_ports
from services.common.discovery import Mesh
from services.common.errors import InvalidArgument
from services.common.peers import POLICY, REGISTRY, open_mesh
from services.gateway.openai_api import chat_request
from services.policy.client import create_key
from services.registry.client import register_model_dir
from tests.cli_runner import run_cli
from tests.harness import MeshProcesses
from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.test_e2e import INT8, LONG_TASK, auth, read_rest, start, typed_details

MODEL = "smollm2-135m-instruct:1"


@dataclass
class RouteMesh:
    procs: MeshProcesses
    mesh: Mesh
    otlp: OtlpReceiver
    replicas: dict[str, str]  # process name -> Consul service id, of the two replicas serving MODEL
    high_key: str  # max priority 7
    low_key: str  # max priority 0, the default

    async def gateway(self) -> gateway_pb2_grpc.GatewayStub:
        endpoint = await self.mesh.resolver("lmesh-gateway").pick()
        return endpoint.stub(gateway_pb2_grpc.GatewayStub)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def routed(consul_agent: ConsulAgent, built_model: Path, tmp_path_factory: pytest.TempPathFactory,
                 ) -> AsyncIterator[RouteMesh]:
    if not (built_model / "lmesh_model.int8.json").exists():
        pytest.skip("no int8 build (make model builds it)")
    otlp = OtlpReceiver()
    procs = MeshProcesses(consul_agent.http_addr, tmp_path_factory.mktemp("route"), await otlp.start())
    await apply_intentions(consul_agent.http_addr)
    mesh = await open_mesh(consul_agent.http_addr, "lmesh-gateway", mtls=True)
    try:
        for service in ("registry", "policy", "tokenizer", "gateway"):
            procs.start(service)
        await procs.wait_passing(mesh, "registry")
        await register_model_dir(mesh.peer(REGISTRY), built_model, aliases=("default",))
        await register_model_dir(mesh.peer(REGISTRY), built_model, aliases=(), manifest_name="lmesh_model.int8.json")
        ports = dict(zip(("inference", "inference-b"), free_ports(2), strict=True))
        for name, port in ports.items():
            procs.start("inference", "--model", MODEL, "--port", str(port), name=name)
        # One decoding and one waiting at most: a third chat finds the queue full.
        procs.start("inference", "--model", INT8, "--max-active", "1", "--max-queue", "1", name="inference-int8")
        for name, port in ports.items():
            await procs.wait_passing(mesh, "inference", name=name, model=MODEL, port=port)
        replicas = {name: e.service_id for e in mesh.resolver("lmesh-inference").endpoints()
                    for name, port in ports.items() if e.port == port}
        await procs.wait_passing(mesh, "inference", name="inference-int8", model=INT8)
        high = await create_key(mesh.peer(POLICY), "route-high", max_priority=7)
        low = await create_key(mesh.peer(POLICY), "route-low")
        for service in ("tokenizer", "gateway"):
            await procs.wait_passing(mesh, service)
        yield RouteMesh(procs, mesh, otlp, replicas, high.api_key, low.api_key)
    finally:
        await mesh.close()
        await procs.stop_all()
        await otlp.stop()


def gateway_span(spans: list[ReceivedSpan], **attributes: object) -> ReceivedSpan | None:
    """The gateway's Chat span whose attributes include `attributes`."""
    return next((s for s in spans if s.service == "lmesh-gateway" and s.name == "lmesh.gateway/Chat"
                 and all(s.attributes.get(k) == v for k, v in attributes.items())), None)


async def replica_of(routed: RouteMesh, completion_id: str) -> str:
    """The replica that served a chat, as its gateway span says."""
    spans = await routed.otlp.wait_for(lambda spans: gateway_span(spans, **{"gen_ai.response.id": completion_id}))
    span = gateway_span(spans, **{"gen_ai.response.id": completion_id})
    assert span is not None
    return str(span.attributes["lmesh.inference.replica"])


@dataclass
class Turn:
    answer: str
    usage: generation_pb2.Usage
    replica: str


async def turn(routed: RouteMesh, messages: list[gateway_pb2.Message], session: str) -> Turn:
    call = (await routed.gateway()).Chat(metadata=auth(routed.low_key), timeout=60)
    await call.write(start(messages=messages, max_tokens=12, session=session))
    await call.done_writing()
    responses = await read_rest(call)
    last = responses[-1]
    assert last.finish_reason in (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)
    return Turn("".join(r.delta for r in responses), last.usage, await replica_of(routed, last.id))


async def test_priority_capped_by_the_key_orders_a_full_queue_through_the_gateway(routed: RouteMesh) -> None:
    """int8 replica, --max-active 1 --max-queue 1: a low chat decodes, another low one waits; a chat at priority 5
    from a key allowed 7 takes the waiting one's place (SHED); a chat asking 9 from a key allowed 0 is clipped to
    0 and so is refused (QUEUE_FULL) instead of shedding the priority-5 one, which runs once the place frees."""
    stub = await routed.gateway()
    calls: list[grpc.aio.StreamStreamCall] = []

    async def open_chat(key: str, max_tokens: int = 8, **fields: object) -> grpc.aio.StreamStreamCall:
        call = stub.Chat(metadata=auth(key), timeout=120)
        await call.write(start(LONG_TASK, model=INT8, max_tokens=max_tokens, **fields))
        calls.append(call)
        return call

    resolver = routed.mesh.resolver("lmesh-inference")
    try:
        decoding = await open_chat(routed.low_key, max_tokens=2000)
        assert (await decoding.read()).delta
        waiting = await open_chat(routed.low_key)  # no priority: its key's, 0
        await resolver.wait_for(lambda e: INT8 in e.models and e.meta.get("load_queued") == "1", timeout=20)
        high = await open_chat(routed.high_key, priority=5)
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            await waiting.read()
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, shed.value.details()
        assert typed_details(shed.value)["ErrorInfo"].reason == "SHED"
        assert "higher priority (5 > 0)" in (shed.value.details() or "")

        clipped = await open_chat(routed.low_key, priority=9)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await clipped.read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        assert typed_details(refused.value)["ErrorInfo"].reason == "QUEUE_FULL"

        await decoding.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
        await decoding.done_writing()
        assert (await read_rest(decoding))[-1].finish_reason == generation_pb2.FINISH_REASON_CANCELLED
        await high.done_writing()
        answer = await read_rest(high)
        assert answer[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert answer[-1].usage.completion_tokens == 8
    finally:
        for call in calls:
            call.cancel()

    def unasked(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:  # the two low chats that named no priority
        return [s for s in spans if s.service == "lmesh-gateway" and s.name == "lmesh.gateway/Chat"
                and s.attributes.get("lmesh.priority") == 0 and "lmesh.request.priority" not in s.attributes]

    def recorded(spans: list[ReceivedSpan]) -> bool:
        return all(gateway_span(spans, **{"lmesh.request.priority": asked}) for asked in (5, 9)) and any(
            s.name == "lmesh.inference/Generate" and s.attributes.get("lmesh.inference.priority") == 5
            for s in spans) and len(unasked(spans)) == 2

    spans = await routed.otlp.wait_for(recorded)
    asked_9, asked_5 = (gateway_span(spans, **{"lmesh.request.priority": p}) for p in (9, 5))
    assert asked_9 is not None and asked_5 is not None
    assert (asked_9.attributes["lmesh.priority"], asked_9.attributes["lmesh.priority.clipped"]) == (0, True)
    assert (asked_5.attributes["lmesh.priority"], asked_5.attributes["lmesh.priority.clipped"]) == (5, False)


async def test_a_session_stays_on_one_of_two_replicas_and_moves_when_its_replica_is_killed(
        routed: RouteMesh) -> None:
    messages = [gateway_pb2.Message(role="system", content="You are a terse assistant. " * 8),
                gateway_pb2.Message(role="user", content="Name a colour.")]
    turns: list[Turn] = []
    for follow_up in ("Name another one.", "And one more.", ""):
        turns.append(await turn(routed, messages, session="conversation-1"))
        messages += [gateway_pb2.Message(role="assistant", content=turns[-1].answer)]
        if follow_up:
            messages += [gateway_pb2.Message(role="user", content=follow_up)]
    replica = turns[0].replica
    assert replica in routed.replicas.values()
    assert [t.replica for t in turns] == [replica] * 3
    for before, after in itertools.pairwise(turns):  # each turn found the one before it cached
        assert after.usage.cached_prompt_tokens >= before.usage.prompt_tokens, (before.usage, after.usage)
    name = next(n for n, service_id in routed.replicas.items() if service_id == replica)
    routed.procs.kill(name)
    await routed.procs.wait_exit(name)
    messages += [gateway_pb2.Message(role="user", content="Which was first?")]
    moved = await turn(routed, messages, session="conversation-1")
    assert moved.replica != replica and moved.replica in routed.replicas.values()
    messages += [gateway_pb2.Message(role="assistant", content=moved.answer),
                 gateway_pb2.Message(role="user", content="Thanks.")]
    after = await turn(routed, messages, session="conversation-1")
    assert after.replica == moved.replica
    assert after.usage.cached_prompt_tokens >= moved.usage.prompt_tokens


async def test_the_operator_cli_grants_a_keys_max_priority_and_its_chats_run_at_it(
        routed: RouteMesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMESH_ADMIN_TOKEN", "")
    monkeypatch.setenv("LMESH_HOME", str(routed.procs.home))
    code, out, err = await asyncio.to_thread(run_cli, ["keys", "create", "--tenant", "cli-route",
                                                       "--max-priority", "6"])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("lmk_") and len(lines[-1]) == 47  # the key alone on the last line
    assert "max priority 6" in lines[0]
    key_id = lines[0].split()[1]
    code, out, err = await asyncio.to_thread(run_cli, ["keys", "update", key_id, "--max-priority", "4"])
    assert code == 0 and "max priority 4" in out, (out, err)
    code, _, err = await asyncio.to_thread(run_cli, ["keys", "update", key_id, "--max-priority", "10"])
    assert code != 0 and "--max-priority: must be in [0, 9]" in err, err
    call = (await routed.gateway()).Chat(metadata=auth(lines[-1]), timeout=60)
    await call.write(start(max_tokens=2))  # no priority: its key's
    await call.done_writing()
    completion_id = (await read_rest(call))[-1].id
    spans = await routed.otlp.wait_for(lambda spans: gateway_span(spans, **{"gen_ai.response.id": completion_id}))
    span = gateway_span(spans, **{"gen_ai.response.id": completion_id})
    assert span is not None and span.attributes["lmesh.priority"] == 4


@pytest.mark.parametrize(("body", "priority"), [({}, None), ({"priority": 3}, 3), ({"priority": None}, None)])
def test_the_http_apis_priority_reaches_the_request_path(body: dict[str, object], priority: int | None) -> None:
    request = chat_request({"messages": [{"role": "user", "content": "hi"}], "user": "alice", **body})
    assert (request.params.priority, request.params.session) == (priority, "alice")


@pytest.mark.parametrize("priority", [-1, 10, "5", 2.5])
def test_the_http_apis_priority_outside_0_to_9_or_not_an_integer_is_refused_naming_it(priority: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        chat_request({"messages": [{"role": "user", "content": "hi"}], "priority": priority})
    assert caught.value.field == "priority"

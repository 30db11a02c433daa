"""lmesh-tools as a real service: on the mTLS mesh of a real Consul agent, found by its `lmesh-tool` tag, called
through the generated stubs, described by server reflection."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import consul.aio
import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from lmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.common.config import ServiceConfig
from services.common.connect import Intention, apply_intentions
from services.common.consul_agent import ConsulAgent
from services.common.discovery import ConsulRegistration, Endpoint, Mesh
from services.common.peers import open_mesh
from services.common.server import RunningService, start_service
from services.tools.catalog import TOOL_TAG, TOOLS, parse_tool_meta
from services.tools.main import build

Code = grpc.StatusCode


@dataclass
class Tools:
    running: RunningService
    name: str  # its Consul service name, of this test module alone
    mesh: Mesh  # the gateway's identity, which an intention allows
    endpoint: Endpoint


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def tools(consul_agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tools]:
    service = f"tools-{uuid.uuid4().hex[:8]}"
    name = f"lmesh-{service}"
    await apply_intentions(consul_agent.http_addr, [Intention("lmesh-gateway", name, "allow"),
                                                    Intention("*", name, "deny")])
    config = ServiceConfig(mtls=True, service=service, consul_addr=consul_agent.http_addr, grace_s=0,
                           data_dir=tmp_path_factory.mktemp("tools"))
    running = await start_service(config, build)
    mesh = await open_mesh(consul_agent.http_addr, "lmesh-gateway", mtls=True)
    try:
        endpoint = await mesh.resolver(name).wait_for(lambda e: e.port == running.port)
        yield Tools(running, name, mesh, endpoint)
    finally:
        await mesh.close()
        await running.stop()


async def test_registers_as_a_tool_provider_with_its_tools_in_meta(tools: Tools, consul_agent: ConsulAgent) -> None:
    async with consul.aio.Consul(host="127.0.0.1", port=consul_agent.http_port) as client:
        _, nodes = await client.health.service(tools.name, passing=True)
    [node] = [n for n in nodes if n["Service"]["Port"] == tools.running.port]
    assert node["Service"]["Tags"] == ["lmesh", TOOL_TAG]
    meta = node["Service"]["Meta"]
    assert parse_tool_meta(meta) == sorted(TOOLS, key=lambda t: t.name)
    assert meta["health_port"]  # the bootstrap's own meta is kept beside the tools'


async def test_tags_default_to_lmesh_alone(consul_agent: ConsulAgent) -> None:
    async with consul.aio.Consul(host="127.0.0.1", port=consul_agent.http_port) as client:
        name = f"lmesh-plain-{uuid.uuid4().hex[:8]}"
        plain = ConsulRegistration(client, name, "127.0.0.1", 1)
        tagged = ConsulRegistration(client, name, "127.0.0.1", 2, tags=("lmesh", "extra"))
        for registration in (plain, tagged):
            await registration.register({})
        try:
            _, nodes = await client.catalog.service(name)
            assert sorted((n["ServicePort"], n["ServiceTags"]) for n in nodes) == [
                (1, ["lmesh"]), (2, ["lmesh", "extra"])]
        finally:
            await plain.deregister()
            await tagged.deregister()


async def test_calls_through_the_generated_stubs(tools: Tools) -> None:
    calculator = tools.endpoint.stub(tools_pb2_grpc.CalculatorStub)
    answer = await calculator.Evaluate(tools_pb2.EvaluateRequest(expression="0.1 + 0.2 * 2^3"), timeout=10)
    assert (answer.value, answer.fraction, answer.exact_decimal) == ("1.7", "17/10", True)
    converter = tools.endpoint.stub(tools_pb2_grpc.UnitConverterStub)
    converted = await converter.Convert(tools_pb2.ConvertRequest(value="100", from_unit="°C", to_unit="fahrenheit"),
                                        timeout=10)
    assert (converted.value, converted.to_unit, converted.quantity) == ("212", "°F", "temperature")
    clock = tools.endpoint.stub(tools_pb2_grpc.ClockStub)
    day = await clock.DayOfWeek(tools_pb2.DayOfWeekRequest(date="2024-07-04"), timeout=10)
    assert day.day_of_week == "Thursday"
    directory = tools.endpoint.stub(tools_pb2_grpc.DirectoryStub)
    legal = await directory.ListDepartment(tools_pb2.ListDepartmentRequest(department="Legal"), timeout=10)
    assert legal.people[0].title == "Head of Legal" and legal.total_matches == len(legal.people)
    person = await directory.GetPerson(tools_pb2.GetPersonRequest(email=legal.people[0].email), timeout=10)
    assert person == legal.people[0]
    geo = tools.endpoint.stub(tools_pb2_grpc.GeoStub)
    distance = await geo.CityDistance(tools_pb2.CityDistanceRequest(from_city="Paris", to_city="Tokyo"), timeout=10)
    assert 9700 < distance.kilometers < 9750 and distance.to_city.timezone == "Asia/Tokyo"
    text = tools.endpoint.stub(tools_pb2_grpc.TextStub)
    cased = await text.ChangeCase(tools_pb2.ChangeCaseRequest(text="Hello World", target_case="snake"), timeout=10)
    assert cased.text == "hello_world"


def bad_request_field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError("no BadRequest detail")


async def test_invalid_argument_names_the_field(tools: Tools) -> None:
    calculator = tools.endpoint.stub(tools_pb2_grpc.CalculatorStub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await calculator.Evaluate(tools_pb2.EvaluateRequest(expression="1/(3-3)"), timeout=10)
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert caught.value.details() == "expression: division by zero at position 1"
    assert bad_request_field(caught.value) == "expression"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await calculator.Evaluate(tools_pb2.EvaluateRequest(expression="10^10^10"), timeout=10)
    assert caught.value.code() == Code.INVALID_ARGUMENT and "bits" in (caught.value.details() or "")
    converter = tools.endpoint.stub(tools_pb2_grpc.UnitConverterStub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await converter.Convert(tools_pb2.ConvertRequest(value="1", from_unit="kg", to_unit="m"), timeout=10)
    assert bad_request_field(caught.value) == "to_unit"
    directory = tools.endpoint.stub(tools_pb2_grpc.DirectoryStub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await directory.GetPerson(tools_pb2.GetPersonRequest(email="nobody@example.com"), timeout=10)
    assert caught.value.code() == Code.NOT_FOUND


async def test_reflection_describes_every_tool_request(tools: Tools) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(tools.endpoint.channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=10)]
        return responses[0]

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {tool.service for tool in TOOLS} <= names
    for tool in TOOLS:
        answer = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=tool.service))
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in answer.file_descriptor_response.file_descriptor_proto]
        tools_file = next(f for f in files if f.package == "lmesh.tools.v1")
        service = next(s for s in tools_file.service if f"{tools_file.package}.{s.name}" == tool.service)
        method = next(m for m in service.method if m.name == tool.method)
        request_name = method.input_type.rsplit(".", 1)[-1]
        request = next(m for m in tools_file.message_type if m.name == request_name)
        assert request.field, f"{tool.name}: {request_name} has no fields"


async def test_an_identity_that_intentions_deny_is_refused(tools: Tools, consul_agent: ConsulAgent) -> None:
    intruder = await open_mesh(consul_agent.http_addr, "lmesh-intruder", mtls=True)
    try:
        endpoint = await intruder.resolver(tools.name).wait_for(lambda e: e.port == tools.running.port)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await endpoint.stub(tools_pb2_grpc.CalculatorStub).Evaluate(
                tools_pb2.EvaluateRequest(expression="1+1"), timeout=10)
        assert caught.value.code() == Code.PERMISSION_DENIED
    finally:
        await intruder.close()


def test_catalog_methods_exist_in_the_proto() -> None:
    services = tools_pb2.DESCRIPTOR.services_by_name
    for tool in TOOLS:
        service = services[tool.service.rsplit(".", 1)[-1]]
        assert service.full_name == tool.service and tool.method in service.methods_by_name

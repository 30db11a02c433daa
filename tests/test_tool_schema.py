"""A tool's schema from server reflection: any gRPC server with reflection is described, JSON goes in and out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st
from lmesh.registry.v1 import registry_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.server import enable_reflection
from services.gateway.tool_schema import describe_method, message_schema, split_method_path

REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


@pytest.fixture
async def reflecting_server() -> AsyncIterator[str]:
    server = grpc.aio.server()
    enable_reflection(server, [REGISTRY])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_a_method_is_described_through_reflection(reflecting_server: str) -> None:
    async with grpc.aio.insecure_channel(reflecting_server) as channel:
        method = await describe_method(channel, f"{REGISTRY}/ResolveModel")
    assert method.path == f"/{REGISTRY}/ResolveModel"
    assert method.parameters["properties"]["reference"] == {"type": "string"}
    assert method.parameters["required"] == ["reference"]
    request = method.request_from_json({"reference": "smollm2:1"})
    assert request.SerializeToString() == registry_pb2.ResolveModelRequest(reference="smollm2:1").SerializeToString()
    with pytest.raises(InvalidArgument) as refused:
        method.request_from_json({"reference": 5, "nope": 1})
    assert refused.value.field == "arguments"
    response = method.response_class()
    response.ParseFromString(registry_pb2.ResolveModelResponse(
        model=registry_pb2.ModelVersion(name="m", version="1")).SerializeToString())
    as_json = method.result_to_json(response)
    assert as_json["model"]["name"] == "m" and as_json["model"]["context_length"] == 0  # defaults shown


async def test_unknown_services_methods_and_servers_without_reflection_fail_clearly(reflecting_server: str) -> None:
    async with grpc.aio.insecure_channel(reflecting_server) as channel:
        with pytest.raises(FailedPrecondition, match="no method Nope"):
            await describe_method(channel, f"{REGISTRY}/Nope")
        with pytest.raises(FailedPrecondition):
            await describe_method(channel, "no.such.Service/Do")
    bare = grpc.aio.server()
    port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(FailedPrecondition, match="no server reflection"):
                await describe_method(channel, f"{REGISTRY}/ResolveModel")
    finally:
        await bare.stop(None)


class _RacingChannel:
    """A channel whose server ends every call before the request is written, the way grpc-aio reports it
    (INTERNAL from the send), then answers `final` (a stand-in: the race is timing-dependent on real servers)."""

    def __init__(self, races: int, final: grpc.StatusCode) -> None:
        self.races, self.final, self.calls = races, final, 0

    def stream_stream(self, path: str, **_: object) -> object:
        def call(requests: object, **__: object) -> AsyncIterator[object]:
            return self._answer()
        return call

    async def _answer(self) -> AsyncIterator[object]:
        self.calls += 1
        if self.calls <= self.races:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "Internal error from Core",
                                       'Failed "execute_batch": (<SendMessageOperation object>,)')
        raise grpc.aio.AioRpcError(self.final, grpc.aio.Metadata(), grpc.aio.Metadata(), "nope")
        yield  # an async generator


async def test_a_server_that_closes_before_the_request_is_sent_is_asked_again() -> None:
    channel = _RacingChannel(races=1, final=grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await describe_method(channel, f"{REGISTRY}/ResolveModel")  # type: ignore[arg-type]
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and channel.calls == 2
    always = _RacingChannel(races=100, final=grpc.StatusCode.UNIMPLEMENTED)
    with pytest.raises(FailedPrecondition, match="no server reflection"):
        await describe_method(always, f"{REGISTRY}/ResolveModel")  # type: ignore[arg-type]


def test_method_paths() -> None:
    assert split_method_path("/a.B/C") == ("a.B", "C")
    for bad in ("", "a.B", "B/C", "a.B/C/D", "/a.B/"):
        with pytest.raises(InvalidArgument):
            split_method_path(bad)


def _message(fields: list[tuple[str, int, int]]) -> descriptor_pb2.DescriptorProto:
    message = descriptor_pb2.DescriptorProto(name="M")
    for number, (name, kind, label) in enumerate(fields, start=1):
        message.field.add(name=name, number=number, type=kind, label=label)
    return message


SCALARS = [descriptor_pb2.FieldDescriptorProto.TYPE_STRING, descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
           descriptor_pb2.FieldDescriptorProto.TYPE_INT64, descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
           descriptor_pb2.FieldDescriptorProto.TYPE_BOOL]
VALUES = {SCALARS[0]: st.text(max_size=10), SCALARS[1]: st.integers(-2**31, 2**31 - 1),
          SCALARS[2]: st.integers(-2**63, 2**63 - 1), SCALARS[3]: st.floats(allow_nan=False, allow_infinity=False),
          SCALARS[4]: st.booleans()}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_scalar_message_round_trips_json_that_fits_its_schema(data: st.DataObject) -> None:
    kinds = data.draw(st.lists(st.sampled_from(SCALARS), min_size=1, max_size=5))
    repeated = data.draw(st.lists(st.booleans(), min_size=len(kinds), max_size=len(kinds)))
    labels = [descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED if r else
              descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL for r in repeated]
    fields = [(f"f{i}", kind, label) for i, (kind, label) in enumerate(zip(kinds, labels, strict=True))]
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    file.message_type.append(_message(fields))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    descriptor = pool.FindMessageTypeByName("t.M")
    schema = message_schema(descriptor)
    arguments = {}
    for (name, kind, _label), many in zip(fields, repeated, strict=True):
        prop = schema["properties"][name]
        assert prop["type"] == ("array" if many else {"string": "string", "int32": "integer", "int64": "integer",
                                                      "double": "number", "bool": "boolean"}[
            descriptor_pb2.FieldDescriptorProto.Type.Name(kind).removeprefix("TYPE_").lower()])
        arguments[name] = data.draw(st.lists(VALUES[kind], max_size=3) if many else VALUES[kind])
    from google.protobuf import json_format

    cls = message_factory.GetMessageClass(descriptor)
    parsed = json_format.ParseDict(arguments, cls())
    for name, value in arguments.items():
        got = getattr(parsed, name)
        assert (list(got) if isinstance(value, list) else got) == value
